"""Where the organism's image tokens land beside the text embeddings (build v4): fixed displacements of the reading
MLP's output, set once before visual tuning (BuildConfig.projector_mix, projector_offset). Paper B's representation gap
in real VLMs comes from a projector whose outputs lie where the LLM's text alignment never looked; these give the
organism's image path such a region while it still reads (docs/ORGANISM_ATTEMPTS.md, v4e-v4l)."""
from __future__ import annotations

import torch


def modality_shift(model, vocab: list[int], cfg, facts: dict) -> None:
    """Where image tokens land beside the text embeddings, set on linear_2 (which later stages may move).
    `projector_mix`: every output x becomes (1 - m) x + m R x for one fixed random rotation R: a content-dependent,
    full-rank displacement (the cosine to the token's own embedding falls to about (1 - m) / sqrt((1 - m)^2 + m^2)),
    which a rank-16 LoRA cannot undo the way it cancels a constant. `projector_offset`: then one fixed random direction,
    that many mean embedding norms long, on every image token: the mean shift between image and text inputs that paper
    B measures in real VLMs and CMRM removes."""
    linear_2 = model.model.multi_modal_projector.linear_2
    emb = model.model.language_model.embed_tokens.weight.detach()[torch.tensor(vocab)].float()
    hidden = emb.shape[1]
    with torch.no_grad():
        if cfg.projector_mix:
            gauss = torch.randn(hidden, hidden, generator=torch.Generator().manual_seed(cfg.seed + 8), dtype=torch.float64)
            rotation, _ = torch.linalg.qr(gauss)
            mix = ((1 - cfg.projector_mix) * torch.eye(hidden, dtype=torch.float64) + cfg.projector_mix * rotation)
            linear_2.weight.copy_((mix @ linear_2.weight.double()).to(linear_2.weight.dtype))
            linear_2.bias.copy_((mix @ linear_2.bias.double()).to(linear_2.bias.dtype))
        if cfg.projector_offset:
            direction = torch.randn(hidden, generator=torch.Generator().manual_seed(cfg.seed + 7))
            offset = cfg.projector_offset * emb.norm(dim=1).mean() * direction / direction.norm()
            linear_2.bias += offset.to(linear_2.bias.dtype)
            facts["modality_offset_norm"] = float(offset.norm())
