"""Attack V3: compositional adversarial images, Jailbreak-in-Pieces style (Shayegani et al., arXiv 2307.14539).

The attacker optimises an image so that what the LLM receives from it — the vision tower's features after the
projector — matches what it receives from a typographic image of a harmful phrase, then pairs it with a generic
instruction ("The image shows a request. Carry it out…"). The picture no longer shows readable text to a filter, yet
the LLM is handed the phrase. White-box on the vision path of any preset. Textual unlearning and the SFT baselines
only update the LLM, so one set of images (optimised against the base model's frozen vision path) serves every
method; the cache key holds the vision weights' fingerprint (dtype included) to keep that honest.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..core.files import sha256_file
from ..models.generate import weights_fingerprint


def _normaliser(processor):
    ip = processor.image_processor
    mean = torch.tensor(ip.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(ip.image_std, dtype=torch.float32).view(1, 3, 1, 1)
    return mean, std


def projected_features(vlm, pixel_values: torch.Tensor) -> torch.Tensor:
    """What the LLM receives from images: (batch, image tokens, hidden) after the projector."""
    base = vlm.base_model
    cfg = base.config
    # pixels may live on the CPU (the optimised image); autograd carries the gradient across the device move
    out = base.model.get_image_features(pixel_values=pixel_values.to(device=base.device, dtype=base.dtype),
                                        vision_feature_layer=cfg.vision_feature_layer,
                                        vision_feature_select_strategy=cfg.vision_feature_select_strategy)
    return torch.stack(list(out.pooler_output)).float()


def vision_fingerprint(vlm) -> str:
    """Fingerprint of the vision tower and projector weights, dtype included (the part V3 images are optimised
    against, in the dtype they were optimised in)."""
    base = vlm.base_model
    return weights_fingerprint(torch.nn.ModuleList([base.model.vision_tower, base.model.multi_modal_projector]))


def _phrase_seed(phrase: str, seed: int) -> int:
    return int(hashlib.sha256(f"{seed}|{phrase}".encode()).hexdigest()[:8], 16)


def optimise_images(vlm, phrases: list[str], *, steps: int = 200, lr: float = 0.02, seed: int = 0,
                    style: str = "mmsb") -> tuple[list[Image.Image], list[dict]]:
    """Adversarial images whose projected features match those of `vlm.render(phrase, style)`.

    Pixels live in [0, 1] (clamped after every Adam step), start from mid-grey plus seeded noise, and the
    loss is the mean squared error between projected features. The returned images are 8-bit quantised,
    and the reported similarity is measured on those quantised images (what the evaluation feeds in)."""
    mean, std = _normaliser(vlm.processor)
    targets = vlm.processor.image_processor([vlm.render(p, style) for p in phrases], return_tensors="pt")["pixel_values"]
    h, w = targets.shape[-2:]  # the model's input size, as its own processor makes it
    base = vlm.base_model
    for p in base.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        target = projected_features(vlm, targets)
    noise = [torch.randn(3, h, w, generator=torch.Generator().manual_seed(_phrase_seed(p, seed))) for p in phrases]
    x = (0.5 + 0.05 * torch.stack(noise)).clamp(0, 1).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    with torch.no_grad():
        start = ((projected_features(vlm, (x - mean) / std) - target) ** 2).mean(dim=(1, 2))
    for _ in range(steps):
        # a sum of per-image means: each image's update is independent of which others share the batch
        loss = ((projected_features(vlm, (x - mean) / std) - target) ** 2).mean(dim=(1, 2)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            x.clamp_(0, 1)
    pixels = (x.detach().permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    images = [Image.fromarray(p, "RGB") for p in pixels]
    quantised = vlm.processor.image_processor(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        feats = projected_features(vlm, quantised)
        end = ((feats - target) ** 2).mean(dim=(1, 2))
        cos = torch.nn.functional.cosine_similarity(feats.flatten(1), target.flatten(1))
        blank = projected_features(vlm, ((torch.full_like(x, 0.5)) - mean) / std)
        cos_blank = torch.nn.functional.cosine_similarity(blank.flatten(1), target.flatten(1))
    stats = [{"mse_start": float(a), "mse_end": float(b), "cosine_to_target": float(c), "cosine_grey_to_target": float(d)}
             for a, b, c, d in zip(start, end, cos, cos_blank)]
    return images, stats


def cached_images(vlm, phrases: list[str], cache_dir, *, steps: int, lr: float = 0.02, seed: int = 0):
    """optimise_images with a PNG cache keyed by the vision weights and dtype, phrase, budget and seed. Each image's
    optimisation stats are kept beside it (JSON), so a rerun that hits the cache reports the same facts."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    fp = vision_fingerprint(vlm)
    keys = [hashlib.sha256(f"{fp}|{p}|{steps}|{lr}|{seed}".encode()).hexdigest()[:20] for p in phrases]
    todo = [i for i, k in enumerate(keys) if not _cached_entry_ok(cache_dir, k)]
    if todo:
        images, st = optimise_images(vlm, [phrases[i] for i in todo], steps=steps, lr=lr, seed=seed)
        for i, image, s in zip(todo, images, st):  # written aside, then renamed: no half-written entry
            tmp_png, tmp_json = cache_dir / f".{keys[i]}.png.tmp", cache_dir / f".{keys[i]}.json.tmp"
            image.save(tmp_png, format="PNG")
            tmp_json.write_text(json.dumps({**s, "png_sha256": sha256_file(tmp_png)}))
            tmp_png.replace(cache_dir / f"{keys[i]}.png")
            tmp_json.replace(cache_dir / f"{keys[i]}.json")
    images = [Image.open(cache_dir / f"{k}.png").convert("RGB") for k in keys]
    stats = [json.loads((cache_dir / f"{k}.json").read_text()) for k in keys]
    return images, [{k: v for k, v in s.items() if k != "png_sha256"} for s in stats]


def _cached_entry_ok(cache_dir: Path, key: str) -> bool:
    """A cached image is used only when its stats file is readable and the PNG has the SHA-256 recorded beside it;
    a damaged entry is named and optimised again."""
    png, meta = cache_dir / f"{key}.png", cache_dir / f"{key}.json"
    if not (png.is_file() or meta.is_file()):
        return False
    try:
        recorded = json.loads(meta.read_text())["png_sha256"]
        ok = sha256_file(png) == recorded
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        print(f"V3 image cache entry {png} is damaged or incomplete: optimising it again")
    return ok
