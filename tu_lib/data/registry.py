"""Datasets by name: notebook parameters name datasets by string."""
from __future__ import annotations

from typing import Callable

from ..core.errors import TuError
from .hub import load_hades, load_jailbreakv_28k, load_pku_saferlhf
from .local import (
    load_advbench,
    load_advbench_strings,
    load_donotanswer,
    load_figstep_benign_templates,
    load_hades_scenarios,
    load_harmbench_multimodal,
    load_harmbench_text,
    load_jailbreak_templates,
    load_llava_bench_coco,
    load_llava_bench_coco_captions,
    load_llava_bench_rules,
    load_mm_safetybench,
    load_objective_examples,
    load_refusal_examples,
    load_safebench,
    load_truthfulqa,
    load_vlguard,
    load_vlguard_gpt4_safe_safes,
    load_xstest,
)

# ---------------------------------------------------------------------------------------------
# registry

DATASETS: dict[str, Callable] = {
    "advbench": load_advbench,
    "advbench_strings": load_advbench_strings,
    "harmbench_text": load_harmbench_text,
    "harmbench_multimodal": load_harmbench_multimodal,
    "safebench": load_safebench,
    "figstep_benign_templates": load_figstep_benign_templates,
    "mm_safetybench": load_mm_safetybench,
    "xstest": load_xstest,
    "truthfulqa": load_truthfulqa,
    "vlguard": load_vlguard,
    "vlguard_gpt4_safe_safes": load_vlguard_gpt4_safe_safes,
    "llava_bench_coco": load_llava_bench_coco,
    "llava_bench_coco_captions": load_llava_bench_coco_captions,
    "llava_bench_rules": load_llava_bench_rules,
    "hades_scenarios": load_hades_scenarios,
    "jailbreak_templates": load_jailbreak_templates,
    "refusal_examples": load_refusal_examples,
    "objective_examples": load_objective_examples,
    "donotanswer": load_donotanswer,
    # hub-only
    "pku_saferlhf": load_pku_saferlhf,
    "jailbreakv_28k": load_jailbreakv_28k,
    "hades": load_hades,
}
HUB_ONLY = ("pku_saferlhf", "jailbreakv_28k", "hades")


def load(name: str, **kw):
    """Load a dataset by registry name (notebook parameters name datasets by string)."""
    if name not in DATASETS:
        raise TuError(f"Unknown dataset {name!r}; valid names: {', '.join(sorted(DATASETS))}.")
    return DATASETS[name](**kw)
