"""The representation gap between text-only and image inputs, and CMRM.

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

from ..core.errors import ParameterError
from ..render.pages import FIGSTEP_TEXT_PROMPT

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
    n = len(instructions)
    blank = meaningless_image(vlm, "blank")
    return {"text": ([vlm.chat(x, False) for x in instructions], [None] * n),
            "typographic": ([vlm.chat(FIGSTEP_TEXT_PROMPT, True)] * n, [vlm.render(x, "figstep") for x in instructions]),
            "blank_image": ([vlm.chat(x, True) for x in instructions], [blank] * n),
            "noise_image": ([vlm.chat(x, True) for x in instructions],
                            [meaningless_image(vlm, "noise", seed + i) for i in range(n)])}


@contextlib.contextmanager
def _captured(vlm, layers: Sequence[int]):
    """Record each chosen decoder layer's output (the tensor CMRM's hooks change). Appended hooks run after
    CMRM's prepended ones, so inside a `cmrm` block the recorded states show the correction."""
    blocks, store, handles = vlm.decoder_layers(), {}, []

    def hook_for(layer):
        def hook(module, args, output):
            store[layer] = output[0] if isinstance(output, tuple) else output
        return hook

    try:
        handles = [blocks[layer].register_forward_hook(hook_for(layer)) for layer in layers]
        yield store
    finally:
        for h in handles:
            h.remove()


def _encode(vlm, texts: list[str], images: list | None):
    """Left-padded inputs of one batch (images None: text only), on the model's device and dtype."""
    tok = vlm.processor.tokenizer
    tok.padding_side = "left"
    if images is not None:
        enc = vlm.processor(text=texts, images=images, return_tensors="pt", padding=True)
    else:
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    enc = {k: v.to(vlm.device) for k, v in enc.items()}
    if "pixel_values" in enc:
        enc["pixel_values"] = enc["pixel_values"].to(vlm.base_model.dtype)
    return enc


@torch.inference_mode()
def hidden_states(vlm, texts: Sequence[str], images: Sequence | None, layers: Sequence[int], *, position: str = "last",
                  batch_size: int = 16, before_batch=None) -> np.ndarray:
    """(n, len(layers), hidden) outputs of the chosen decoder layers: at the last position (the one that
    decides the answer) or the mean over text tokens (image positions and padding excluded).
    `texts` are fully formatted (chat template applied); `images[i]` is None for text-only inputs. These are
    the raw layer outputs, the tensors CMRM shifts (for the last layer: before the LLM's final norm).
    `before_batch(indices)` is called before each forward pass."""
    if position not in POSITIONS:
        raise ParameterError(f"position {position!r} must be one of {POSITIONS}.")
    layers = check_layers(vlm, layers)
    images = list(images) if images is not None else [None] * len(texts)
    image_id = vlm.base_model.config.image_token_id
    out = []
    with _captured(vlm, layers) as store:
        for start in range(0, len(texts), batch_size):
            for kind in ("text", "image"):  # a batch's pixel_values must match its placeholders
                idx = [i for i in range(start, min(start + batch_size, len(texts))) if (images[i] is None) == (kind == "text")]
                if not idx:
                    continue
                enc = _encode(vlm, [texts[i] for i in idx], [images[i] for i in idx] if kind == "image" else None)
                if before_batch is not None:  # e.g. Steering.select for sample-level CMRM
                    before_batch(idx)
                vlm.model(**enc, logits_to_keep=1)  # only the layer outputs are needed, not the vocabulary logits
                if position == "last":
                    rows = torch.stack([store[layer][:, -1] for layer in layers], 1)
                else:
                    keep = (enc["attention_mask"].bool() & (enc["input_ids"] != image_id)).unsqueeze(-1).float()
                    rows = torch.stack([(store[layer] * keep).sum(1) / keep.sum(1) for layer in layers], 1)
                out += list(zip(idx, rows.float().cpu().numpy()))
    out.sort(key=lambda pair: pair[0])
    return np.stack([row for _, row in out])


def condition_states(vlm, instructions: Sequence[str], layers: Sequence[int], *, position: str = "last",
                     batch_size: int = 16, seed: int = 0, conditions: Sequence[str] = CONDITIONS) -> dict[str, np.ndarray]:
    """{condition: (n, len(layers), d)} hidden states of the same instructions under matched_inputs' conditions."""
    inputs = matched_inputs(vlm, instructions, seed=seed)
    return {c: hidden_states(vlm, *inputs[c], layers, position=position, batch_size=batch_size) for c in conditions}


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


def gap_table(states: dict[str, np.ndarray], layers: Sequence[int], reference: str = "text", seed: int = 0,
              harmful: np.ndarray | None = None):
    """Per condition and layer: gap_metrics between that condition's states and the reference condition's.
    `states[c]` is (n, len(layers), d) from hidden_states, same instructions in the same order. `harmful` (n bools,
    optional) adds the cosine between the harmful-minus-benign directions under the condition and in the reference."""
    import pandas as pd

    if reference not in states:
        raise ParameterError(f"reference condition {reference!r} is not among {list(states)}.")
    rows = []
    for cond, h in states.items():
        if cond == reference:
            continue
        for j, layer in enumerate(layers):
            row = {"condition": cond, "layer": layer, **gap_metrics(h[:, j], states[reference][:, j], seed=seed)}
            if harmful is not None:
                ref = states[reference][:, j]
                row["direction_cosine"] = direction_cosine(h[harmful, j], h[~harmful, j], ref[harmful], ref[~harmful])
            rows.append(row)
    return pd.DataFrame(rows)


def direction_cosine(harmful_a: np.ndarray, benign_a: np.ndarray, harmful_b: np.ndarray, benign_b: np.ndarray) -> float:
    """Cosine between the harmful-minus-benign directions of two modalities: near 1, what separates harmful
    from benign in text also separates it with images (the refusal direction carries over)."""
    u, v = harmful_a.mean(0) - benign_a.mean(0), harmful_b.mean(0) - benign_b.mean(0)
    return float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))


def mean_shift(with_image: np.ndarray, text: np.ndarray) -> np.ndarray:
    """CMRM's dataset-level shift from paired states (row i: the same prompt with and without the meaningless
    image): the mean of the differences over the rows."""
    return (with_image - text).mean(0)


def shift_vectors(vlm, chats_with_image: Sequence[str], chats_text: Sequence[str], meaningless_images: Sequence,
                  layers: Sequence[int], *, position: str = "last") -> dict[int, torch.Tensor]:
    """CMRM's dataset-level shift per layer: mean over the anchor prompts of h(x, meaningless image) - h(x).
    `chats_with_image[i]` and `chats_text[i]` are the same prompt formatted with and without the image."""
    if not (len(chats_with_image) == len(chats_text) == len(meaningless_images)) or not chats_text:
        raise ParameterError("shift_vectors needs one image chat, one text chat and one meaningless image per anchor prompt.")
    layers = check_layers(vlm, layers)
    with_image = hidden_states(vlm, chats_with_image, meaningless_images, layers, position=position)
    text = hidden_states(vlm, chats_text, None, layers, position=position)
    diff = mean_shift(with_image, text)
    return {layer: torch.from_numpy(diff[j]) for j, layer in enumerate(layers)}


def sample_shift_vectors(vlm, items: Sequence[dict], meaningless: str, layers: Sequence[int], *, position: str = "last",
                         seed: int = 0) -> dict[int, torch.Tensor]:
    """CMRM's sample-level shift per layer, one row per item: h(x_i, meaningless image) - h(x_i), where x_i is
    the item's text prompt (two extra forward passes per input). `items` are stage 03's item dicts."""
    if not items:
        raise ParameterError("sample_shift_vectors needs at least one item.")
    images = [meaningless_image(vlm, meaningless, seed + i) for i in range(len(items))]
    with_image = hidden_states(vlm, [vlm.chat(it["prompt"], True) for it in items], images, layers, position=position)
    text = hidden_states(vlm, [vlm.chat(it["prompt"], False) for it in items], None, layers, position=position)
    diff = with_image - text
    return {layer: torch.from_numpy(diff[:, j]) for j, layer in enumerate(check_layers(vlm, layers))}
