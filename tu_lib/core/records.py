"""Run records: what a reviewer needs to trust an output folder (parameters, commit, versions, what the
numbers were computed on).
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from importlib import metadata

from .paths import REPO_ROOT


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


_RECORDED_PACKAGES = ("torch", "transformers", "peft", "datasets", "accelerate", "numpy", "pandas",
                      "scikit-learn", "pillow", "papermill", "tu")


_MODEL_DTYPES: dict[str, list[str]] = {}


def note_model_dtype(name: str, dtype) -> None:
    """Remember that this process computed with model `name` in `dtype` (the model loaders call this), so the
    run records it writes say what the numbers were computed in."""
    seen = _MODEL_DTYPES.setdefault(str(name), [])
    text = str(dtype).replace("torch.", "")
    if text not in seen:
        seen.append(text)


def _device() -> str:
    """Where the stage's torch work ran: the GPUs if any are visible, else the CPU."""
    try:
        import torch
    except ImportError:
        return "cpu"
    if torch.cuda.is_available():
        return f"cuda x{torch.cuda.device_count()} ({torch.cuda.get_device_name(0)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def compute_facts() -> dict:
    """What the numbers were computed on: the dtype of every model this process loaded, the GPUs' names or
    torch's CPU kernel capability (e.g. AVX512, or AVX2 under ATEN_CPU_CAPABILITY=avx2: float32 kernels round
    differently per capability) and the thread count."""
    facts: dict = {"model_dtypes": {k: list(v) for k, v in _MODEL_DTYPES.items()}}
    try:
        import torch
    except ImportError:
        return facts
    facts["torch_threads"] = torch.get_num_threads()
    facts["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    facts["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    facts["isa_env"] = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
                        if k in os.environ}
    return facts


def run_record(params: dict, inputs: dict[str, str], started: float, seeds: dict | None = None, **extra) -> dict:
    """What a reviewer needs to trust an output folder: parameters, commit, versions, device, what the numbers
    were computed on (dtypes, CPU capability or GPUs, threads), seeds, input hashes and wall time."""
    versions = {}
    for name in _RECORDED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "params": params,
        "git_commit": git_commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
        "device": _device(),
        "compute": compute_facts(),
        "seeds": seeds or {},
        "inputs_sha256": inputs,
        "wall_time_s": round(time.time() - started, 2),
        **extra,
    }
