"""Output files later stages trust because they exist: written whole or not at all, read with clear errors."""
import json

import matplotlib.pyplot as plt
import pandas as pd
import pytest

from tu_lib.core import TuError, atomic_path, plots, read_jsonl, write_csv, write_json, write_jsonl


class Boom(Exception):
    pass


def _failing_rows():
    yield {"a": 1}
    raise Boom("interrupted mid-way")


def test_an_interrupted_write_keeps_the_old_file_and_leaves_no_scratch(tmp_path):
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, [{"a": 0}, {"a": 0}])
    with pytest.raises(Boom):
        write_jsonl(path, _failing_rows())
    assert read_jsonl(path) == [{"a": 0}, {"a": 0}]          # the previous complete file, not a torn one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]
    with pytest.raises(Boom), atomic_path(tmp_path / "new.csv") as tmp:
        tmp.write_text("half")
        raise Boom("stopped")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]  # no new.csv, no scratch


def test_writers_produce_the_files_they_name(tmp_path):
    write_json(tmp_path / "r.json", {"b": 1, "a": [1, 2]})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": [1, 2], "b": 1}
    write_csv(pd.DataFrame({"x": [1, 2], "y": ["a", "b"]}), tmp_path / "t.csv")
    assert (tmp_path / "t.csv").read_bytes() == b"x,y\n1,a\n2,b\n"
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    out = plots.save_figure(fig, pd.DataFrame({"x": [0, 1]}), "f", tmp_path / "figs")
    assert out["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out["csv"].read_text() == "x\n0\n1\n"
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["f.csv", "f.png"]


def test_a_damaged_jsonl_names_the_file_the_line_and_the_fix(tmp_path):
    path = tmp_path / "set.jsonl"
    path.write_text('{"id": 1}\n\n{"id": 2, "prompt": "cut sho\n')
    with pytest.raises(TuError, match=r"set\.jsonl line 3 is not valid JSON .*Re-run the stage"):
        read_jsonl(path)
    path.write_text('{"id": 1}\n[1, 2]\n')
    with pytest.raises(TuError, match="line 2 is not a JSON object"):
        read_jsonl(path)


def test_run_record_says_what_the_numbers_were_computed_on(monkeypatch):
    import torch

    from tu_lib import core, models
    from tu_lib.core import records

    monkeypatch.setattr(records, "_MODEL_DTYPES", {})
    models.load_vlm("micro")
    models.load_vlm("micro", dtype="bfloat16")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        facts = core.run_record({}, {}, 0.0)["compute"]
    finally:
        torch.set_num_threads(threads)
    assert facts["model_dtypes"] == {"micro": ["float32", "bfloat16"]}  # every dtype this process computed in
    assert facts["torch_threads"] == 1
    assert facts["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")  # recorded as set (it only acts when torch starts)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: f"GPU model {i}")
    facts = core.compute_facts()
    assert facts["gpus"] == ["GPU model 0", "GPU model 1"] and facts["isa_env"] == {"ATEN_CPU_CAPABILITY": "avx2"}


def test_check_run_records_fails_when_a_record_was_not_computed_as_required(tmp_path):
    import subprocess
    import sys

    from tu_lib.core import repo_root

    def record(name, capability, dtypes):
        path = tmp_path / name
        write_json(path, {"compute": {"cpu_capability": capability, "model_dtypes": {"organism": dtypes}}})
        return str(path)

    def check(*args):
        return subprocess.run([sys.executable, str(repo_root() / "scripts" / "check_run_records.py"), *args],
                              capture_output=True, text=True)

    avx2 = [record("a.json", "AVX2", ["bfloat16"]), record("b.json", "AVX2", ["bfloat16"])]
    assert check("--min", "2", "--expect", "cpu_capability=AVX2", "--expect", "model_dtypes.organism=bfloat16", *avx2).returncode == 0
    native = record("c.json", "AVX512", ["float32", "bfloat16"])
    out = check("--expect", "cpu_capability=AVX2", "--expect", "model_dtypes.organism=bfloat16", *avx2, native)
    assert out.returncode == 1 and "c.json: compute.cpu_capability is 'AVX512', not 'AVX2'" in out.stderr
    assert "model_dtypes.organism is ['float32', 'bfloat16']" in out.stderr and "a.json" not in out.stderr
    out = check("--min", "3", "--expect", "cpu_capability=AVX2", *avx2, str(tmp_path / "missing.json"))
    assert out.returncode == 1 and "only 2 run records found" in out.stderr
