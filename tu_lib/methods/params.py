"""Stage 02's parameters (its notebook's Spec): also read by stage 04, which times stage 02's own steps."""
from __future__ import annotations

from .. import models
from ..core import params
from ..core.errors import ParameterError
from ..core.params import Param, Spec, dtype_value, non_negative, positive, positive_size, seed_value
from ..core.text import as_list
from ..models.vlm import LM_LINEARS
from .config import RUN_DEFAULTS
from .registry import METHODS

NOTEBOOK = "02_unlearn"


# ---------------------------------------------------------------------------------------------
# parameters


def _methods_check(v):
    bad = [m for m in v if m not in METHODS]
    if bad or not v:
        return f"names unknown method(s) {bad}; choose from {list(METHODS)}" if bad else "must name at least one method"
    if len(set(v)) != len(v):
        return "names a method twice"
    return None


def _targets_check(v):
    if not v or not all(isinstance(n, str) and n.isidentifier() for n in v):
        return "must be module names like ['q_proj', 'v_proj']"
    unknown = [n for n in v if n not in LM_LINEARS]
    # every preset's LLM is Llama-shaped (Vicuna, SmolLM2, the micro Llama): these are its decoder-layer linears
    return f"names {unknown}, which are not decoder-layer linears of the LLM ({', '.join(LM_LINEARS)})" if unknown else None


SPEC = Spec(NOTEBOOK, [
    Param("profile", (str,), "default", "settings profile: smoke, default (the organism on CPU) or paper (LLaVA-1.5-7B, GPU)"),
    Param("preset", (str,), None, "model preset: micro, organism, llava-1.5-7b or llava-1.5-13b", profiled=True),
    Param("methods", (list, str), None, f"methods to train, from {list(METHODS)} (list or comma-separated)", profiled=True),
    Param("steps", (int,), None, "maximum optimizer steps per method", positive, profiled=True),
    Param("lr", (float,), None, "AdamW learning rate (linear decay, no warm-up, as Yao et al.)", positive, profiled=True),
    Param("batch_size", (int,), None, "forget prompts per step (as many mismatch and normal rows)", positive, profiled=True),
    Param("lora", (bool,), RUN_DEFAULTS["lora"], "LoRA on the LLM (True) or full fine-tuning of the LLM (False)"),
    Param("lora_r", (int,), None, "LoRA rank", positive, profiled=True),
    Param("lora_alpha", (int,), None, "LoRA alpha", positive, profiled=True),
    Param("lora_targets", (list, str), None, "LLM linears that get adapters (list or comma-separated)", profiled=True),
    Param("lora_first_layer", (int,), None, "first decoder layer with adapters (later layers too); 0: all", non_negative,
          profiled=True),
    Param("ga_weight", (float,), RUN_DEFAULTS["ga_weight"], "weight of the gradient-ascent term (Yao et al.: 0.5)", non_negative),
    Param("mismatch_weight", (float,), RUN_DEFAULTS["mismatch_weight"], "weight of the random-mismatch NLL term (Yao et al.: 1)", non_negative),
    Param("kl_weight", (float,), RUN_DEFAULTS["kl_weight"], "weight of the KL-to-frozen term on normal data (Yao et al.: 1)", non_negative),
    Param("npo_beta", (float,), RUN_DEFAULTS["npo_beta"], "β of NPO", positive),
    Param("max_forget_nll", (float,), RUN_DEFAULTS["max_forget_nll"], "stop rule: ascent methods stop once the forget NLL exceeds this (Yao et al.: 100)",
          positive),
    Param("n_forget", (int, str), None, "forget prompts used (int or 'all')", positive_size, profiled=True),
    Param("answer_tokens", (int,), 32, "length of the generated forget answers (organism, micro)", positive),
    Param("checkpoint_every", (int,), None, "steps between resumable checkpoints", positive, profiled=True),
    Param("curve_points", (int,), None, "adapters kept for training curves: at least this many geometrically spaced "
          "steps ending at the last one (out_dir/<method>/curve/); 0: only the final adapter", non_negative,
          profiled=True),
    Param("n_check", (int,), None, "prompts per set in the quick before/after ASR check (0: skip)", non_negative, profiled=True),
    Param("seed", (int,), RUN_DEFAULTS["seed"], "seed of the batch schedule and initialisation", seed_value),
    Param("dtype", (str,), "auto", "model dtype: auto (float32 on a CPU, bf16 on a GPU), float32 or bfloat16",
          dtype_value),
    Param("model_dir", (str,), "", "local folder of a llava-hf checkpoint (paper presets without the hub)", folder=True),
    Param("data_dir", (str,), None, "stage 01's output folder (the curated sets)", profiled=True, kind="path"),
    Param("out_dir", (str,), None, "where adapters, loss curves and run records go", profiled=True, kind="output"),
    Param("fig_dir", (str,), None, "folder for the loss-curve figure and its CSV", profiled=True, kind="figures"),
])


def resolve_params(namespace: dict) -> dict:
    """Validate the notebook's parameters (before any model is loaded)."""
    raw = params.user_variables(namespace)
    for key in ("methods", "lora_targets"):
        if isinstance(raw.get(key), (str, tuple)):
            namespace = {**namespace, key: as_list(raw[key])}
    P = params.resolve(SPEC, namespace)
    for key, check in (("methods", _methods_check), ("lora_targets", _targets_check)):
        P[key] = as_list(P[key])
        problem = check(P[key])
        if problem:
            raise ParameterError(f"Parameter {key}={P[key]!r} {problem}.")
    if P["preset"] not in models.PRESETS:
        raise ParameterError(f"Unknown model preset {P['preset']!r}; valid presets: {', '.join(models.PRESETS)}.")
    return P
