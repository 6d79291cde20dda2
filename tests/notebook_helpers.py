"""Helpers shared by the tests: running a notebook through papermill as a user does (expecting it to stop early and
write nothing), and perturbing a layer's weights for a block."""
import contextlib
import json

import papermill as pm
import pytest


def stops_early(notebook, tmp_path, message: str, cell: int, **parameters) -> None:
    """Execute `notebook` with the smoke profile and outputs under tmp_path; it must fail with `message`
    in code cell `cell` (0 = the validation cell after the parameters) and leave no outputs behind."""
    parameters = {"profile": "smoke", "out_dir": str(tmp_path / "runs"), "fig_dir": str(tmp_path / "figures"), **parameters}
    with pytest.raises(pm.PapermillExecutionError) as err:
        pm.execute_notebook(str(notebook), str(tmp_path / "out.ipynb"), parameters=parameters, progress_bar=False,
                            kernel_name="python3", cwd=str(notebook.parent))
    assert message in str(err.value), str(err.value)[-500:]
    nb = json.loads((tmp_path / "out.ipynb").read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"
            and not {"parameters", "injected-parameters"} & set(c["metadata"].get("tags", []))]
    assert any(o.get("output_type") == "error" for o in code[cell]["outputs"]), f"expected the stop in code cell {cell}"
    assert not (tmp_path / "runs").exists() and not (tmp_path / "figures").exists()


def code_cells(path) -> list[dict]:
    """A notebook's code cells without the cell papermill injects for its -p parameters."""
    nb = json.loads(path.read_text())
    return [c for c in nb["cells"] if c["cell_type"] == "code" and "injected-parameters" not in c["metadata"].get("tags", [])]


def injected_source(path) -> str:
    """The source of the cell papermill injected (empty if none)."""
    nb = json.loads(path.read_text())
    return "".join("".join(c["source"]) for c in nb["cells"] if "injected-parameters" in c["metadata"].get("tags", []))


def finished_method_run(run, preset: str = "organism", weights: bytes | None = None) -> None:
    """A stage-02 method folder as train() leaves it: a readable adapter and a summary recording each file's hash
    (stages 03-05 trust nothing else). `weights` changes the adapter's content (a retrained adapter)."""
    import json
    from pathlib import Path

    import torch
    from safetensors.torch import save_file

    from tu_lib.core import file_hashes

    run = Path(run)
    (run / "adapter").mkdir(parents=True, exist_ok=True)
    tensor = torch.tensor(list(weights or b"w"), dtype=torch.float32)
    save_file({"lora": tensor}, str(run / "adapter" / "adapter_model.safetensors"))
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "losses.csv").write_text("step\n1\n")
    files = file_hashes(run, ["adapter/adapter_model.safetensors", "adapter/adapter_config.json", "losses.csv"])
    (run / "summary.json").write_text(json.dumps({"preset": preset, "steps_done": 1, "files": files}))


@contextlib.contextmanager
def perturbed(layer):
    """`layer`'s weights moved by noise for the block (a stand-in for another model's weights), restored after."""
    import torch

    saved = {n: p.detach().clone() for n, p in layer.named_parameters()}
    try:
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(0.05 * torch.randn_like(p))
        yield
    finally:
        with torch.no_grad():
            for n, p in layer.named_parameters():
                p.copy_(saved[n])
