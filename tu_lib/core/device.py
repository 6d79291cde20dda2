"""Where and in what precision models compute: dtype resolution (float32 on any CPU), the device, seeding and
the organism build's autocast. torch is imported inside the functions, so parameter checks run before it loads.
"""
from __future__ import annotations

import contextlib
import os
import random
from typing import Any

from .errors import ParameterError

DTYPES = ("auto", "float32", "bfloat16")


# ---------------------------------------------------------------------------------------------
# loading


def quiet_transformers() -> None:
    """No progress bars and no info/warning chatter: notebook outputs stay identical between runs."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def resolve_dtype(dtype: Any = "auto", device: str = "cpu"):
    """"auto" is float32 on a CPU, whatever instructions it has, so a run's numbers do not depend on which CPU
    made them (bf16 changed 14 of 32 greedy outputs on one machine); on CUDA it is bfloat16 where supported,
    else float16. bfloat16 on a CPU is an explicit choice (faster with AMX / AVX512-BF16, other numbers).
    Also accepts "float32", "bfloat16" or a torch dtype."""
    import torch

    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ParameterError(f"dtype must be a floating dtype, got {dtype}.")
        return dtype
    if dtype == "float32":
        return torch.float32
    if dtype == "bfloat16":
        return torch.bfloat16
    if dtype != "auto":
        raise ParameterError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}.")
    if str(device).startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def default_dtype(device: str = "cpu"):
    """What dtype="auto" means on this device (float32 on any CPU)."""
    return resolve_dtype("auto", device)


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AMX or AVX512-BF16); elsewhere bf16 is emulated and
    much slower than float32. Only the organism build asks (train.autocast); loading never depends on it."""
    import torch

    fast = False
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(torch.cpu, probe, None)
        try:
            fast = fast or bool(fn and fn())
        except RuntimeError:
            pass
    return fast


FORCE_DTYPE_ENV = "TU_FORCE_DTYPE"


def forced_dtype(dtype: Any, preset: str) -> Any:
    """$TU_FORCE_DTYPE (float32 or bfloat16) replaces the dtype every load_vlm call asks for: `make test-bf16`
    runs the notebooks' code path in bf16 with it. A warning says so, so it is never on by accident."""
    forced = os.environ.get(FORCE_DTYPE_ENV)
    if not forced:
        return dtype
    if forced not in ("float32", "bfloat16"):
        raise ParameterError(f"${FORCE_DTYPE_ENV}={forced!r} must be float32 or bfloat16 (it replaces the dtype of "
                             f"every model load_vlm loads); unset it for a normal run.")
    if dtype != forced:
        import warnings

        warnings.warn(f"${FORCE_DTYPE_ENV}={forced} replaces dtype={dtype!r} for the {preset} model; its numbers are "
                      f"not comparable with the committed (float32) ones. Unset it for a normal run.", stacklevel=3)
    return forced


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"  # under `accelerate launch`, each process its own GPU


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast():
    """The organism build's training precision: bf16 autocast where the CPU has fast bf16 matmuls (AMX /
    AVX512-BF16), else plain fp32 (on an AVX2-only CPU bf16 is emulated and ~50x slower than fp32). This is
    the one place that depends on the CPU: it is how the committed parts were built, and it only runs when the
    parts are rebuilt (`make organism`, checked against the card's CIs by `make organism-check`). Models are
    loaded and evaluated in float32 on any CPU (core.device.resolve_dtype)."""
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16) if cpu_has_fast_bf16() else contextlib.nullcontext()
