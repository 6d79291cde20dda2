"""Stage 05 (groundwork): the representation gap between text-only and image inputs, and CMRM.

Paper B (Liu et al., arXiv 2410.09047) explains safety degradation by a shift of the LLM's hidden states when an
image is present, away from the text-only space the LLM was aligned in, and corrects it at inference time
(CMRM): v^l = mean over an anchor set of h^l(x, meaningless image) - h^l(x), then h^l - alpha * v^l. The layers
and token positions are not published, so both are parameters here. The hooks are registered with
prepend=True: transformers 5 records hidden states with its own hooks, and only a prepended hook makes the
recorded states show the correction (shared notes, feasibility §5).
"""
from __future__ import annotations

import contextlib
import math
from typing import Sequence

import numpy as np
import torch

from .core import ParameterError

__all__ = ["check_layers", "check_alphas", "meaningless_image", "matched_inputs", "hidden_states", "gap_metrics",
           "gap_table", "direction_cosine", "shift_vectors", "cmrm", "alpha_sweep"]

POSITIONS = ("last", "mean")
CONDITIONS = ("text", "typographic", "blank_image", "noise_image")


def check_layers(vlm, layers: Sequence[int]) -> list[int]:
    """Decoder layer indices (0-based; negative counts from the end), checked before any forward pass."""
    n = len(vlm.decoder_layers())
    if not layers:
        raise ParameterError("layers must name at least one decoder layer.")
    out = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not -n <= layer < n:
            raise ParameterError(f"Layer {layer!r} is not a decoder layer of the {vlm.preset} LLM (0..{n - 1}, or -{n}..-1).")
        out.append(layer % n)
    return sorted(set(out))


def check_alphas(alphas: Sequence[float]) -> list[float]:
    """A CMRM alpha grid: finite numbers in [0, 2] (paper B uses alpha in [0, 1]; beyond 1 over-corrects)."""
    if not alphas:
        raise ParameterError("The alpha grid is empty; give e.g. [0, 0.5, 1.0, 1.5].")
    for a in alphas:
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or not 0 <= a <= 2:
            raise ParameterError(f"alpha {a!r} must be a finite number in [0, 2].")
    return [float(a) for a in alphas]


def meaningless_image(vlm, kind: str, seed: int = 0):
    """CMRM's img': a white image, or uniform RGB noise (seeded), at the vision tower's input size."""
    from PIL import Image

    size = vlm.base_model.config.vision_config.image_size
    if kind == "blank":
        return Image.new("RGB", (size, size), "white")
    if kind == "noise":
        pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        return Image.fromarray(pixels, "RGB")
    raise ParameterError(f"meaningless image kind {kind!r} must be 'blank' or 'noise'.")


def matched_inputs(vlm, instructions: Sequence[str], seed: int = 0) -> dict[str, tuple[list[str], list]]:
    """The same instructions under four conditions, as (formatted texts, images): as text; shown only as a
    typographic image with FigStep's benign prompt; as text beside a blank image; beside a noise image."""
    from .render import FIGSTEP_TEXT_PROMPT

    n = len(instructions)
    blank = meaningless_image(vlm, "blank")
    return {"text": ([vlm.chat(x, False) for x in instructions], [None] * n),
            "typographic": ([vlm.chat(FIGSTEP_TEXT_PROMPT, True)] * n, [vlm.render(x, "figstep") for x in instructions]),
            "blank_image": ([vlm.chat(x, True) for x in instructions], [blank] * n),
            "noise_image": ([vlm.chat(x, True) for x in instructions],
                            [meaningless_image(vlm, "noise", seed + i) for i in range(n)])}


@torch.inference_mode()
def hidden_states(vlm, texts: Sequence[str], images: Sequence | None, layers: Sequence[int], *, position: str = "last",
                  batch_size: int = 8) -> np.ndarray:
    """(n, len(layers), hidden) hidden states at the output of each decoder layer: at the last position (the
    one that decides the answer) or the mean over text tokens (image positions and padding excluded).
    `texts` are fully formatted (chat template applied); `images[i]` is None for text-only inputs. As
    transformers records it, the last layer's state is taken after the LLM's final norm."""
    if position not in POSITIONS:
        raise ParameterError(f"position {position!r} must be one of {POSITIONS}.")
    layers = check_layers(vlm, layers)
    images = list(images) if images is not None else [None] * len(texts)
    tok, image_id = vlm.processor.tokenizer, vlm.base_model.config.image_token_id
    tok.padding_side = "left"
    out = []
    for start in range(0, len(texts), batch_size):
        for kind in ("text", "image"):  # a batch's pixel_values must match its placeholders
            idx = [i for i in range(start, min(start + batch_size, len(texts))) if (images[i] is None) == (kind == "text")]
            if not idx:
                continue
            if kind == "image":
                enc = vlm.processor(text=[texts[i] for i in idx], images=[images[i] for i in idx], return_tensors="pt",
                                    padding=True)
            else:
                enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            hs = vlm.model(**enc, output_hidden_states=True).hidden_states  # [embeddings, layer 0, layer 1, ...]
            if position == "last":
                rows = torch.stack([hs[layer + 1][:, -1] for layer in layers], 1)
            else:
                keep = (enc["attention_mask"].bool() & (enc["input_ids"] != image_id)).unsqueeze(-1).float()
                rows = torch.stack([(hs[layer + 1] * keep).sum(1) / keep.sum(1) for layer in layers], 1)
            out += list(zip(idx, rows.float().cpu().numpy()))
    out.sort(key=lambda pair: pair[0])
    return np.stack([row for _, row in out])


def gap_metrics(a: np.ndarray, b: np.ndarray, *, seed: int = 0, folds: int = 5) -> dict:
    """How far apart two groups of hidden states (n, d) are: centroid distance over the within-group spread
    (root mean squared distance to the own centroid), and a linear probe's cross-validated accuracy (0.5 = the
    groups are indistinguishable)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ParameterError(f"gap_metrics needs two (n, d) arrays of one width, got {a.shape} and {b.shape}.")
    spread = math.sqrt((((a - a.mean(0)) ** 2).sum(1).mean() + ((b - b.mean(0)) ** 2).sum(1).mean()) / 2)
    distance = float(np.linalg.norm(a.mean(0) - b.mean(0)))
    k = min(folds, len(a), len(b))
    probe = float("nan")
    if k >= 2:
        x, y = np.vstack([a, b]), np.r_[np.zeros(len(a)), np.ones(len(b))]
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        probe = float(cross_val_score(clf, x, y, cv=StratifiedKFold(k, shuffle=True, random_state=seed)).mean())
    return {"centroid_distance": distance, "within_spread": spread,
            "normalised_distance": distance / spread if spread > 0 else float("inf"), "probe_accuracy": probe}


def gap_table(states: dict[str, np.ndarray], layers: Sequence[int], reference: str = "text", seed: int = 0):
    """Per condition and layer: gap_metrics between that condition's states and the reference condition's.
    `states[c]` is (n, len(layers), d) from hidden_states, same instructions in the same order."""
    import pandas as pd

    if reference not in states:
        raise ParameterError(f"reference condition {reference!r} is not among {list(states)}.")
    rows = []
    for cond, h in states.items():
        if cond == reference:
            continue
        for j, layer in enumerate(layers):
            rows.append({"condition": cond, "layer": layer, **gap_metrics(h[:, j], states[reference][:, j], seed=seed)})
    return pd.DataFrame(rows)


def direction_cosine(harmful_a: np.ndarray, benign_a: np.ndarray, harmful_b: np.ndarray, benign_b: np.ndarray) -> float:
    """Cosine between the harmful-minus-benign directions of two modalities: near 1, what separates harmful
    from benign in text also separates it with images (the refusal direction carries over)."""
    u, v = harmful_a.mean(0) - benign_a.mean(0), harmful_b.mean(0) - benign_b.mean(0)
    return float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))


def shift_vectors(vlm, chats_with_image: Sequence[str], chats_text: Sequence[str], meaningless_images: Sequence,
                  layers: Sequence[int], *, position: str = "last") -> dict[int, torch.Tensor]:
    """CMRM's dataset-level shift per layer: mean over the anchor prompts of h(x, meaningless image) - h(x).
    `chats_with_image[i]` and `chats_text[i]` are the same prompt formatted with and without the image."""
    if not (len(chats_with_image) == len(chats_text) == len(meaningless_images)) or not chats_text:
        raise ParameterError("shift_vectors needs one image chat, one text chat and one meaningless image per anchor prompt.")
    layers = check_layers(vlm, layers)
    with_image = hidden_states(vlm, chats_with_image, meaningless_images, layers, position=position)
    text = hidden_states(vlm, chats_text, None, layers, position=position)
    diff = (with_image - text).mean(0)
    return {layer: torch.from_numpy(diff[j]) for j, layer in enumerate(layers)}


@contextlib.contextmanager
def cmrm(vlm, vectors: dict[int, torch.Tensor], alpha: float):
    """Within the block, every position's output of each chosen decoder layer is h - alpha * v (generation
    and recorded hidden states alike); the hooks are removed on exit, which restores the model exactly."""
    check_alphas([alpha])
    blocks = vlm.decoder_layers()
    check_layers(vlm, list(vectors))
    handles = []

    def hook_for(vec):
        def hook(module, args, output):
            if isinstance(output, tuple):  # older layer API: (hidden, ...)
                return (output[0] - alpha * vec.to(output[0]),) + output[1:]
            return output - alpha * vec.to(output)  # the layer's dtype and device (GPU presets)
        return hook

    try:
        for layer, vec in vectors.items():
            handles.append(blocks[layer % len(blocks)].register_forward_hook(hook_for(vec), prepend=True))
        yield vlm
    finally:
        for h in handles:
            h.remove()


def alpha_sweep(vlm, items: list[dict], vectors: dict[int, torch.Tensor], alphas: Sequence[float], judges, *,
                max_new_tokens: int, batch_size: int, label: str = "base", seed: int = 0):
    """Generate every item (stage 03's item dicts) under CMRM at each alpha and judge the answers with an
    `evaluate.Judges`: tidy rows as in stage 03's results.csv, plus the alpha. Alpha 0 is the unsteered model.
    With an adapter applied (unlearn.adapter_applied), this is textual unlearning and CMRM combined."""
    import pandas as pd

    from .evaluate import metric_rows
    from .generate import generate

    rows = []
    for alpha in check_alphas(alphas):
        with cmrm(vlm, vectors, alpha):
            answers = generate(vlm.model, vlm.processor, [it["text"] for it in items], [it["image"] for it in items],
                               max_new_tokens=max_new_tokens, batch_size=batch_size, desc=f"{label} alpha {alpha:g}")
        judged = judges.judge(items, answers)
        rows += [dict(r, alpha=alpha) for r in metric_rows(vlm.preset, label, judged, judges.provenance(), seed)]
    return pd.DataFrame(rows)
