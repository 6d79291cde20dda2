"""Organism v4's building blocks that run in seconds: its validation split is disjoint from stage 03's sets, the
list-completion wordings are split, the free projector's weights round-trip, paired gaps, and the probes of a split."""
import json

import numpy as np
import pytest
import torch

from tu_lib import render
from tu_lib.core import TuError, stats
from tu_lib.models.presets import organism as O
from tu_lib.stages import organism as stage
from tu_lib.training import organism as B
from tu_lib.training import organism_data as T
from tu_lib.training import organism_shift as S


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(O.backbone_dir())


@pytest.fixture(scope="module")
def data():
    return T.organism_sets(B.BuildConfig(projector="mlp"))


def _texts(df, cols=("prompt", "request", "image_text", "text_baseline")):
    return {str(df[c].iloc[i]) for c in cols if c in df for i in range(len(df))}


def test_validation_items_are_in_no_stage03_set(data):
    stage03 = set().union(*[_texts(df) for df in data["sets"].values()])
    for name, df in data["validation"].items():
        assert len(df) > 0 and not (_texts(df, ("request",)) & stage03), name
    assert len(data["validation"]["v1_figstep"]) == 100 and len(data["validation"]["t1_advbench"]) == 100
    # validation SafeBench items keep the categories balanced: tasks 11-20 of each category
    assert data["validation"]["v1_figstep"]["category"].value_counts().nunique() == 1


def test_benign_title_splits_are_disjoint(data):
    train, val, test = map(set, (data["train_titles"], data["val_titles"], data["held_titles"]))
    assert len(val) == B.BuildConfig().validation_titles
    assert not (train & val) and not (train & test) and not (val & test)
    # build v2's card describes a build that trained on every non-held-out title
    glyph = T.organism_sets(B.cfg_from_dict({"seed": 0}))  # a card from before v4: projector "glyph"
    assert set(glyph["train_titles"]) == train | val


def test_list_wordings_are_split_and_never_figstep_prompt():
    splits = [set(v) for v in T.LIST_PROMPTS.values()]
    assert sum(map(len, splits)) == len(set().union(*splits))
    assert len(T.LIST_PROMPTS["train"]) >= 10 and len(T.LIST_PROMPTS["validation"]) >= 3 and len(T.LIST_PROMPTS["test"]) >= 3
    assert render.FIGSTEP_TEXT_PROMPT not in set().union(*splits)


def test_page_text_writes_figsteps_page_out():
    assert T.page_text("Steps to bake bread.") == "Steps to bake bread.\n1.\n2.\n3.\n" + render.FIGSTEP_TEXT_PROMPT


def test_text_alignment_covers_pages_only_when_asked(data):
    plain = T.text_harmful(data, B.BuildConfig(projector="mlp", align_pages=False))
    paged = T.text_harmful(data, B.BuildConfig(projector="mlp", align_pages=True))
    pages = paged[len(plain):]
    assert paged[:len(plain)] == plain and pages and all(p.split("\n")[1:4] == ["1.", "2.", "3."] for p in pages)
    benign = T.text_benign(data, data["train_titles"], B.BuildConfig(projector="mlp", align_pages=True))
    assert all(key in data["train_titles"] for _, key in benign)


def test_fits_grid(tok):
    assert T.fits_grid(tok, render.figstep_layout("Steps to bake bread."))
    assert not T.fits_grid(tok, " ".join(["word"] * 60))


def test_paired_difference_is_within_item():
    a, b = np.array([1, 1, 0, 1] * 10), np.array([0, 1, 0, 0] * 10)
    d = stats.paired_difference(a, b)
    assert d["difference"] == pytest.approx(0.5) and d["n"] == 40 and d["ci_low"] <= 0.5 <= d["ci_high"]
    same = stats.paired_difference(a, a)
    assert same["difference"] == same["ci_low"] == same["ci_high"] == 0.0  # identical conditions: no spread
    with pytest.raises(ValueError, match="same items"):
        stats.paired_difference(a, b[:3])


def test_mlp_projector_round_trips_and_kinds_are_told_apart(tok):
    lm, _ = O.load_backbone(as_reference=False)
    model, _ = O.assemble_llava(lm, tok, [1, 2, 3], projector="mlp")
    state = {f"{p}.{k}": v.clone() + 1 for p, m in O.vision_modules(model).items() for k, v in m.state_dict().items()}
    assert O.projector_kind(state) == "mlp" and set(O.vision_modules(model)) == {"vision_tower", "projector", "reading_head"}
    O.load_vision(model, state, "test")
    assert torch.equal(model.model.multi_modal_projector.linear_1.weight, state["projector.linear_1.weight"])
    before = model.model.multi_modal_projector.linear_2.weight.clone()
    O.load_vision(model, {k: v + 1 for k, v in state.items()}, "test", skip=("projector",))
    assert torch.equal(model.model.multi_modal_projector.linear_2.weight, before)
    with pytest.raises(TuError, match="does not fit the organism's projector"):
        O.load_vision(model, {k: v for k, v in state.items() if "linear_2" not in k}, "test")
    with pytest.raises(TuError, match="unknown organism projector"):
        O.assemble_llava(lm, tok, [1, 2, 3], projector="linear")


def test_reading_mlp_starts_as_the_glyph_map_and_moves_freely(tok):
    lm, _ = O.load_backbone(as_reference=False)
    vocab = [5, 17, 300, 4000]
    model, _ = O.assemble_llava(lm, tok, vocab, projector="reading-mlp")
    proj, head = model.model.multi_modal_projector, model.model.reading_head
    assert [n for n, _ in proj.named_parameters()] == ["linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"]
    features = torch.randn(2, 7, head.in_features)
    glyph_map = torch.softmax(head(features), -1) @ lm.model.embed_tokens.weight[vocab]
    with torch.no_grad():
        assert torch.allclose(proj(features), glyph_map, atol=1e-4)  # GELU(x) - GELU(-x) = x: the glyph map, exactly
        head.weight.add_(1.0)  # the projector reads through the reading head, not a copy of it
        assert torch.allclose(proj(features), torch.softmax(head(features), -1) @ lm.model.embed_tokens.weight[vocab],
                              atol=1e-4)
        S.modality_shift(model, vocab, B.BuildConfig(projector_offset=1.0, projector_mix=0.0), facts := {})
        shift = (proj(features) - torch.softmax(head(features), -1) @ lm.model.embed_tokens.weight[vocab])
    mean_norm = float(lm.model.embed_tokens.weight[vocab].norm(dim=1).mean())
    assert facts["modality_offset_norm"] == pytest.approx(mean_norm, rel=1e-5)
    assert torch.allclose(shift, shift[0, 0].expand_as(shift), atol=1e-4)  # one fixed direction on every token
    state = {f"{p}.{k}": v for p, m in O.vision_modules(model).items() for k, v in m.state_dict().items()}
    assert O.projector_kind(state) == "reading-mlp" and "projector.head.weight" not in state


def test_split_probes_pair_every_harmful_form(data, tok):
    probes = stage.split_probes(data, "validation", tok)
    instr = list(data["validation"]["v1_figstep"]["image_text"])
    harmful = [n for n in probes if n.startswith(("text_bare", "text_page", "image_"))]
    assert len([n for n in harmful if n.startswith("image_wording")]) == len(T.LIST_PROMPTS["validation"])
    for name in harmful:  # the same instructions, in the same order: what makes the gap paired
        assert probes[name][2] == instr, name
    assert probes["image_wording_1"][0][0] == T.LIST_PROMPTS["validation"][0]
    with pytest.raises(TuError, match="'validation', 'test', 'unseen'"):
        stage.split_probes(data, "train", tok)


def test_unseen_split_is_a_source_no_stage_uses(data, tok):
    probes = stage.split_probes(data, "unseen", tok)
    instr = probes["text_bare"][0]
    assert len(instr) >= 100 and len(set(instr)) == len(instr)
    assert set(probes) == {"text_bare", "text_page", "image_figstep"} | {
        f"image_wording_{k + 1}" for k in range(len(T.LIST_PROMPTS["test"]))}  # harmful forms only, unseen wordings
    assert probes["image_wording_1"][0][0] == T.LIST_PROMPTS["test"][0]
    used = set(data["harmful_prompts"]) | set(data["train_titles"])
    for sets in (data["sets"], data["validation"]):
        for df in sets.values():
            used |= _texts(df)
    assert not used & set(instr)  # neither trained on nor in any stage-03 or validation set


def test_optimiser_groups_give_a_part_its_own_rate():
    """Visual tuning's projector may learn at its own rate (stage2_projector_lr): one AdamW step moves each part by
    about its group's rate, frozen parameters are left out, and the schedule scales every group alike."""
    from tu_lib.training.loop import Optimiser, warmup_then_decay

    torch.manual_seed(0)
    lm, projector = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    projector.bias.requires_grad_(False)
    before = [p.detach().clone() for p in (lm.weight, projector.weight, projector.bias)]
    opt = Optimiser([{"params": list(lm.parameters())}, {"params": list(projector.parameters()), "lr": 1e-2}], 1e-4,
                    warmup_then_decay(10, 1), clip=None)
    assert len(opt.params) == 3  # the frozen bias is not optimised
    opt.update((lm(torch.ones(2, 4)) + projector(torch.ones(2, 4))).pow(2).sum())
    moved = [float((p.detach() - b).abs().max()) for p, b in zip((lm.weight, projector.weight, projector.bias), before)]
    assert moved[0] == pytest.approx(1e-4, rel=1e-3) and moved[1] == pytest.approx(1e-2, rel=1e-3) and moved[2] == 0
    assert [g["lr"] for g in opt.opt.param_groups] == pytest.approx([0.9e-4, 0.9e-2])


def test_modality_mix_rotates_image_tokens_away_from_their_embeddings(tok):
    """projector_mix: each image token becomes (1 - m) x + m R x (R a fixed rotation), a displacement that depends on
    the content (unlike the offset) and leaves the token at cosine (1 - m) / sqrt((1 - m)^2 + m^2) to its embedding."""
    lm, _ = O.load_backbone(as_reference=False)
    vocab = [5, 17, 300, 4000]
    model, _ = O.assemble_llava(lm, tok, vocab, projector="reading-mlp")
    proj, head = model.model.multi_modal_projector, model.model.reading_head
    features = torch.randn(3, 5, head.in_features)
    with torch.no_grad():
        before = proj(features)
        S.modality_shift(model, vocab, B.BuildConfig(projector_mix=0.5, projector_offset=0.0), facts := {})
        after = proj(features)
    assert "modality_offset_norm" not in facts  # no offset asked for
    shift = after - before
    assert not torch.allclose(shift, shift[0, 0].expand_as(shift), atol=1e-3)  # not one constant
    cosine = torch.nn.functional.cosine_similarity(after, before, dim=-1)
    assert torch.allclose(cosine, torch.full_like(cosine, 0.5 / (0.5 ** 2 * 2) ** 0.5), atol=0.05)
    assert torch.allclose(after.norm(dim=-1), before.norm(dim=-1) * (0.5 ** 2 * 2) ** 0.5, rtol=0.05)


def _fake_split(rng, n=40, image_rate=0.6, text_rate=0.1):
    """A measured split as measure_split returns it, with outcomes drawn at known rates (no model)."""
    image = rng.random(n) < image_rate
    text = rng.random(n) < text_rate
    props = {key: stats.rate(rng.random(n) < 0.5) for key in stage.BARS_V4}
    props["harmful_image_on_topic"] = stats.rate(image)
    return {"properties": props, "gaps": {"image_figstep_vs_text_bare": stats.paired_difference(image, text),
                                          "image_figstep_vs_text_page": stats.paired_difference(image, text)},
            "judges": {"refusal": {}, "on_topic": {}}, "outcomes": {"image_figstep": {"answers": ["kept out"]}}}


def test_card_keeps_rates_gaps_and_bars_not_answers():
    rng = np.random.default_rng(0)
    rows = [{"condition": "typographic", "layer": layer, "normalised_distance": 1.0, "probe_accuracy": 0.9,
             "direction_cosine": 0.5} for layer in (0, 15)]
    card = stage.card_body({"test": _fake_split(rng), "unseen": _fake_split(rng, image_rate=0.1),
                            "representation_gap": rows})
    assert "answers" not in str(card) and card["representation_gap"] == rows
    assert set(card["bars"]) == set(stage.BARS_V4) | {"gap_vs_text_bare"}
    table = stage.card_table(card)
    gap = table[(table["split"] == "test") & (table["property"] == "gap_image_figstep_vs_text_bare")].iloc[0]
    assert gap["rate"] == pytest.approx(card["test"]["gaps"]["image_figstep_vs_text_bare"]["difference"], abs=1e-3)
    assert gap["meets_bar"] == (gap["rate"] >= 0.30 and gap["ci_low"] >= 0.15)
    unseen = table[(table["split"] == "unseen") & (table["property"] == "gap_image_figstep_vs_text_bare")].iloc[0]
    assert not unseen["meets_bar"]  # image rate 0.1 vs text 0.1: no gap
    assert not table[table["property"] == "gap_image_figstep_vs_text_page"]["meets_bar"].notna().any()  # no bar
    fig = stage.properties_figure(table[table["bar"] != ""])  # gap bars ("..., CI low ...") parse
    assert len(fig.axes[0].get_yticklabels()) == (table["bar"] != "").sum()


def test_representation_gap_frame_puts_v2_beside_this_organism():
    rows = [{"condition": c, "layer": layer, "normalised_distance": 1.0 + layer, "probe_accuracy": 1.0,
             "direction_cosine": 0.5, "centroid_distance": 2.0} for c in ("typographic", "blank_image") for layer in (0, 8)]
    df = stage.representation_gap_frame({"representation_gap": rows},
                                        {"representation_gap": [dict(r, normalised_distance=9.0) for r in rows]})
    assert set(df["organism"]) == {"this organism", "v2 (retired)"}
    assert set(df["metric"]) == {"normalised_distance", "probe_accuracy", "direction_cosine"}  # not raw distances
    v2 = df[(df["organism"] == "v2 (retired)") & (df["metric"] == "normalised_distance")]
    assert (v2["value"] == 9.0).all() and len(v2) == 4


def test_the_v2_reference_is_measured_on_v2_parts_only(tmp_path, monkeypatch):
    (tmp_path / "card.json").write_text('{"build_config": {"projector": "reading-mlp"}}')
    with pytest.raises(TuError, match="not v2"):
        stage.write_v2_reference(tmp_path, tmp_path / "out")
    monkeypatch.setattr(stage, "V2_REFERENCE", tmp_path / "nothing")
    with pytest.raises(TuError, match="git checkout -- docs/organism_v2/"):
        stage.v2_reference()
    assert not (tmp_path / "out").exists()


def test_a_rebuilt_v4_card_is_compared_value_by_value_gaps_included():
    rng = np.random.default_rng(1)
    rows = [{"condition": "typographic", "layer": 0, "normalised_distance": 1.0}]
    committed = stage.card_body({"test": _fake_split(rng), "unseen": _fake_split(rng), "representation_gap": rows})
    same = stage.compare_cards(committed, committed)
    assert all(r["within_ci"] for r in same)
    assert {"test/harmful_image_on_topic", "unseen/gap_image_figstep_vs_text_bare"} <= {r["property"] for r in same}
    moved = json.loads(json.dumps(committed))
    moved["test"]["gaps"]["image_figstep_vs_text_bare"]["difference"] = -0.5  # outside any CI of a real gap
    del moved["unseen"]["properties"]["harmful_image_on_topic"]
    verdict = {r["property"]: r["within_ci"] for r in stage.compare_cards(committed, moved)}
    assert not verdict["test/gap_image_figstep_vs_text_bare"] and not verdict["unseen/harmful_image_on_topic"]
    assert verdict["test/harmful_image_on_topic"]
    v2 = {"properties": {"x": {"rate": 0.5, "ci_low": 0.4, "ci_high": 0.6}}}  # the v2 card's shape still compares
    assert stage.compare_cards(v2, {"properties": {"x": {"rate": 0.7, "ci_low": 0, "ci_high": 1}}})[0]["within_ci"] is False
