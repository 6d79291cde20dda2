"""The generation items of every evaluated set: chat-formatted prompts, rendered or optimised images, instructions."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.errors import TuError
from ..core.text import take
from ..data.sets import EVAL_SETS, STAGE01_FILE, eval_sets, is_user_set
from ..data.splits import assign_splits, select_split, split_rows
from ..data.user_sets import read_user_set
from ..evaluation import adversarial
from ..models.presets import reading_titles
from ..render.pages import FIGSTEP_TEXT_PROMPT


def build_items(vlm, P: dict, name: str, v3_cache: Path | None = None) -> tuple[list[dict], dict]:
    """Generation items of one set: {"key", "set", "text" (chat-formatted), "image", "instruction"}; also
    facts about the set (V3 optimisation quality). The set's P["split"] part is taken first, then its first
    P["n_per_set"] items. A user set (`user_...`, from P["user_sets"]) is read whole from its file (it has no split)."""
    if is_user_set(name):
        return user_items(vlm, P, name), {}
    spec, facts = EVAL_SETS[name], {}
    if name == "utility_reading":
        rows = reading_rows(vlm, P)
    else:
        rows = take(split_rows(P["data_dir"], STAGE01_FILE.get(name, name), P["split"]), P["n_per_set"])
    images: list = [None] * len(rows)
    if spec.image in ("figstep", "mmsb"):
        images = [vlm.render(r["image_text"], spec.image) for r in rows]
    elif spec.image == "adversarial":
        images, stats = adversarial.cached_images(vlm, [r["image_text"] for r in rows], v3_cache, steps=P["v3_steps"],
                                                  seed=P["seed"])
        done = [s for s in stats if s]
        if done:
            facts["v3_cosine_to_target"] = float(np.mean([s["cosine_to_target"] for s in done]))
            facts["v3_cosine_grey_to_target"] = float(np.mean([s["cosine_grey_to_target"] for s in done]))
    elif spec.image == "photo":
        images = [r["image_obj"] for r in rows]
    items = []
    for r, image in zip(rows, images):
        prompt = r.get("prompt") or FIGSTEP_TEXT_PROMPT
        items.append({"key": f"{name}|{r['id']}", "set": name, "id": r["id"], "image": image,
                      "text": vlm.chat(prompt, image is not None), "prompt": prompt,
                      "instruction": r.get("request") or r.get("image_text") or prompt})
    return items, facts


def user_items(vlm, P: dict, name: str) -> list[dict]:
    """The items of a user set (its first n_per_set rows): the row's image file, its image_text rendered in the
    model's typography (FigStep style, like V1), or text only. The key carries a digest of what the model is shown,
    so an edited row is answered afresh instead of clashing with its saved generation."""
    from PIL import Image


    spec = eval_sets(P.get("user_sets") or []).get(name)
    if spec is None:
        raise TuError(f"Set {name!r} is a user set, but no file in user_sets gives it: pass its file in user_sets.")
    items = []
    for r in take(read_user_set(spec.path), P["n_per_set"]):
        if r["image"]:
            with Image.open(r["image"]) as im:
                image = im.convert("RGB")
        else:
            image = vlm.render(r["image_text"], "figstep") if r["image_text"] else None
        prompt = r["prompt"] or FIGSTEP_TEXT_PROMPT
        items.append({"key": f"{name}|{r['id']}|{r['digest']}", "set": name, "id": r["id"], "image": image,
                      "text": vlm.chat(prompt, image is not None), "prompt": prompt, "category": r["category"],
                      "instruction": r["request"] or r["image_text"] or prompt})
    return items


def reading_rows(vlm, P: dict) -> list[dict]:
    """Benign reading utility: the organism's held-out benign titles shown as FigStep-style images (answered on
    topic = read and answered); for llava presets, LLaVA-Bench-COCO questions with images from a folder. The titles
    are split like stage 01's sets (assign_splits, by their first word: Steps / Methods / List), so benign reading has
    validation and test parts too."""
    titles = reading_titles(vlm.preset, P["seed"])
    if titles is not None:
        rows = [{"id": f"title:{i}", "image_text": t, "request": t, "prompt": FIGSTEP_TEXT_PROMPT, "split": s}
                for i, (t, s) in enumerate(zip(titles, assign_splits(t.split()[0] for t in titles)))]
        return take(select_split(rows, P["split"], "the held-out benign titles"), P["n_per_set"])
    if not P["llava_images_dir"]:
        return []
    from PIL import Image


    rows = take(split_rows(P["data_dir"], "utility_llava_bench", P["split"]), P["n_per_set"])
    folder = Path(P["llava_images_dir"])
    missing = [r["image"] for r in rows if not (folder / r["image"]).is_file()]
    if missing:
        raise TuError(f"{len(missing)} LLaVA-Bench-COCO images are missing from {folder} (e.g. {missing[0]}).")
    return [dict(r, image_obj=Image.open(folder / r["image"]).convert("RGB")) for r in rows]
