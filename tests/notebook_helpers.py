"""Running a notebook through papermill as a user does, expecting it to stop early and write nothing."""
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
