"""What stages 03 and 05 read (stage 01's sets, stage 02's adapters), checked before any model loads."""
from __future__ import annotations

import json
from pathlib import Path

from ..core.errors import TuError
from ..core.files import sha256_file
from ..core.params import resolve_path
from ..data.sets import EVAL_SETS, STAGE01_FILE, is_user_set, stage01_file, user_set_name
from ..data.splits import split_rows
from ..data.user_sets import read_user_set, user_set_files, user_set_paths
from ..judges.encoder import minilm_dir
from ..methods.run import method_problem
from ..models.vlm import HUB_IDS


def resolve_user_sets(P: dict) -> None:
    """Stages 03 and 05's `user_sets` parameter: the files as absolute paths (extension and names checked), and each
    file's set (`user_<stem>`) appended to P["sets"], so it is built, generated, judged and reported like the rest.
    The files' contents are checked by check_eval_inputs."""
    P["user_sets"] = user_set_paths(P["user_sets"])
    P["sets"] = [*P["sets"], *(user_set_name(p) for p in P["user_sets"])]


def check_eval_inputs(P: dict) -> None:
    """Fail before loading a model: stage 01's files and each method's adapter must exist, every user set must be
    readable (columns, rows, images), the paper presets' reading utility needs its images, the evaluated sets must
    carry stage 01's validation/test split (unless split is "all") and the judges' encoder must be installed. Stages 03
    and 05 run it first."""
    llava_reading = P.get("preset") in HUB_IDS and "utility_reading" in P["sets"]
    if llava_reading and not P.get("llava_images_dir"):
        raise TuError(f"utility_reading on {P['preset']} reads LLaVA-Bench-COCO images: pass `-p llava_images_dir DIR` "
                      "(see docs/PAPER_SCALE.md), or drop utility_reading from sets.")
    input_files(P)
    evaluated = [STAGE01_FILE.get(n, n) for n in P["sets"] if n in EVAL_SETS]  # not stage 05's anchors (forget)
    if llava_reading:
        evaluated.append("utility_llava_bench")
    for name in dict.fromkeys(f for f in evaluated if f):
        split_rows(P["data_dir"], name, P["split"])  # an old stage-01 output without the split is named now
    if {"harmfulness", "on_topic"} & set(P.get("judges") or []):
        minilm_dir()  # the sentence encoder these judges need is a pip package: say so now, not after generation


def input_files(P: dict) -> list[Path]:
    """The files this stage reads: stage 01's sets, the user sets with their images (each file read and checked in
    full: read_user_set) and each method's adapter (each must exist)."""
    built_in = [n for n in P["sets"] if not is_user_set(n)]
    files = [stage01_file(P["data_dir"], f) for f in dict.fromkeys(STAGE01_FILE.get(n, n) for n in built_in) if f]
    for path in P.get("user_sets") or []:
        files += user_set_files(path, read_user_set(path))
    for m in P["methods"]:
        if m == "base":
            continue
        run = resolve_path(P["unlearn_dir"]) / m
        adapter = [run / "adapter" / "adapter_model.safetensors", run / "adapter" / "adapter_config.json"]
        if (run / "llm.safetensors").is_file() and not adapter[0].is_file():
            raise TuError(f"{P['unlearn_dir']}/{m} holds a full fine-tune (stage 02 with `-p lora False`); stages 03 "
                          "and 05 evaluate LoRA adapters only: rerun notebook 02 with `-p lora True`.")
        missing = [f.name for f in adapter if not f.is_file()]
        if missing:
            raise TuError(f"No complete adapter for method {m!r} in {P['unlearn_dir']}/{m}/adapter (missing "
                          f"{', '.join(missing)}): run notebook 02 with `-p methods {m}` first, or drop it from methods.")
        problem = method_problem(run)
        if problem:
            raise TuError(f"The {m!r} run in {P['unlearn_dir']} cannot be trusted: {problem}. Rerun notebook 02 with "
                          f"`-p methods {m}` (it trains a damaged method again), or drop {m} from methods.")
        trained_on = json.loads((run / "summary.json").read_text()).get("preset")
        if trained_on and P.get("preset") and trained_on != P["preset"]:
            raise TuError(f"The {m!r} adapter in {P['unlearn_dir']} was trained on preset {trained_on!r}, not "
                          f"{P['preset']!r}: pass the matching preset or the unlearn_dir of a {P['preset']} run.")
        files += adapter
    return files


def input_hashes(P: dict) -> dict[str, str]:
    """file -> sha256 of what the stage read, for its run record (which adapters produced these numbers)."""
    return {str(p): sha256_file(p) for p in input_files(P)}
