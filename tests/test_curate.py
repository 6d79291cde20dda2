"""Stage 01 splits: disjoint roles, leak guards, determinism and prefix structure of the profiles."""
import pandas as pd
import pytest

from tu_lib import data
from tu_lib.core import TuError, normalise_prompt, params
from tu_lib.data import curation as curate
from tu_lib.data import splits


def build(profile="default", **over):
    P = params.resolve(curate.SPEC, {"profile": profile, **over})
    return curate.apply_sizes(curate.build_pools(P))


@pytest.fixture(scope="module")
def default():
    return build("default")


@pytest.fixture(scope="module")
def smoke():
    return build("smoke")


def test_no_shared_normalised_prompt_between_any_two_sets(default):
    """Alignment, forget, retain and every evaluation set share no normalised prompt — checked on the
    full pools too, so no profile size can create an overlap."""
    for sets in (default.sets, default.pools):
        table = curate.overlap_table(sets)
        assert len(table) == len(curate.SET_NAMES) * (len(curate.SET_NAMES) - 1) // 2
        assert table["shared"].sum() == 0, table[table["shared"] > 0]


def test_overlap_table_detects_a_shared_prompt(default):
    leaked = dict(default.sets)
    leaked["forget"] = pd.concat([default.sets["forget"], default.sets["t1_advbench"].head(1).assign(set="forget")])
    table = curate.overlap_table(leaked)
    row = table[(table.set_a == "t1_advbench") & (table.set_b == "forget")]
    assert int(row["shared"].iloc[0]) == 1


def test_training_items_are_not_near_copies_of_evaluation_requests(default):
    eval_words = [set(t.split()) for n in curate.EVAL_SETS for _, r in default.pools[n].iterrows()
                  for t in curate.item_texts(r)]
    for name in curate.TRAIN_SETS:
        for text in default.pools[name]["request"].head(60):
            w = set(normalise_prompt(text).split())
            worst = max(len(w & e) / len(w | e) for e in eval_words)
            assert worst < 0.8, (name, text[:40])
    assert any(d["reason"] == "near duplicate of evaluation item" for d in default.dropped)


def test_smoke_sets_are_prefixes_of_default_sets(default, smoke):
    for name in curate.SET_NAMES:
        small, big = smoke.sets[name]["id"].tolist(), default.sets[name]["id"].tolist()
        assert big[: len(small)] == small, name


def test_splits_depend_on_the_seed_only_through_the_permutations(default):
    again = build("default")
    other = build("default", seed=1)
    for name in curate.SET_NAMES:
        assert again.sets[name].equals(default.sets[name]), f"{name} differs on a rebuild with the same seed"
    changed = {n for n in curate.SET_NAMES if other.sets[n]["id"].tolist() != default.sets[n]["id"].tolist()}
    # V1 is SafeBench-tiny first and then a fixed order; the LLaVA-Bench reading set is taken whole
    assert set(curate.SET_NAMES) - changed == {"v1_figstep", "utility_llava_bench"}


def test_v1_starts_with_safebench_tiny(default):
    tiny = data.load_safebench(tiny=True)
    first = default.sets["v1_figstep"].head(50)
    assert sorted(first["image_text"]) == sorted(tiny["instruction"])
    assert set(first["text_baseline"]) == set(tiny["question"])


def test_t3_wraps_its_request_in_a_template(default):
    for _, row in default.sets["t3_jailbreak"].head(20).iterrows():
        assert row["request"] in row["prompt"] and len(row["prompt"]) > len(row["request"])
    assert default.sets["t3_jailbreak"]["template"].nunique() > 10


def test_roles_and_categories_are_recorded(default):
    for name, df in default.sets.items():
        assert (df["role"] == curate.ROLE[name]).all()
        assert df["id"].is_unique, name
    assert set(default.sets["v2_mmsb_typo"]["category"].str[:2]) <= set(curate.HARMFUL_MMSB_SCENARIOS)
    assert default.sets["forget"]["category"].nunique() == len(curate.DNA_HARMFUL_AREAS)


def test_asking_for_more_items_than_a_pool_holds_is_refused():
    with pytest.raises(TuError, match="n_v2=100000"):
        build("smoke", n_v2=100000)


def test_stratified_order_balances_every_prefix():
    df = pd.DataFrame({"c": list("aaaabbbbcccc"), "x": range(12)})
    out = curate.stratified_order(df, "c", seed=0)
    for k in range(1, 13):
        counts = out["c"].head(k).value_counts().reindex(list("abc"), fill_value=0)
        assert counts.max() - counts.min() <= 1, (k, counts.to_dict())
    assert sorted(out["x"]) == list(range(12))


# ---- validation and test (issue 19): every evaluation and utility set split in two, on its pool ---------------------


def signatures(row) -> set:
    """What makes two items the same item: a normalised text it carries, with its photo where it has one (LLaVA-Bench
    asks one question about several photos)."""
    image = row.get("image") if isinstance(row.get("image"), str) else None
    return {(text, image) for text in curate.item_texts(row)}


def parts(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    return {s: df[df["split"] == s] for s in ("validation", "test")}


def test_validation_and_test_never_share_an_item(default):
    for name in curate.EVAL_SETS:
        for df in (default.pools[name], default.sets[name]):
            assert set(df["split"]) <= {"validation", "test"}, name
            val, test = parts(df).values()
            assert not set(val["id"]) & set(test["id"]), name
            shared = set().union(*map(signatures, val.to_dict("records"))) & set().union(
                *map(signatures, test.to_dict("records")))
            assert not shared, (name, sorted(shared)[:2])
    for name in curate.TRAIN_SETS:  # training-side sets are not evaluated: no split
        assert "split" not in default.sets[name], name


def test_every_prefix_holds_both_parts_and_every_category_in_both(default, smoke):
    """Any profile's set is a prefix of its pool: each prefix of two or more items has both parts, and each category
    with two or more items in it is in both (within a category the items alternate, so never off by more than one)."""
    for name in curate.EVAL_SETS:
        pool = default.pools[name]
        sizes = sorted({2, 3, 5, 8, 13, 50, len(smoke.sets[name]), len(default.sets[name]), len(pool)})
        for k in (k for k in sizes if 2 <= k <= len(pool)):
            prefix = pool.head(k)
            val, test = parts(prefix).values()
            assert len(val) and len(test), (name, k)
            counts = prefix.groupby(["category", "split"]).size().unstack(fill_value=0)
            counts = counts.reindex(columns=["validation", "test"], fill_value=0)
            assert ((counts["validation"] - counts["test"]).abs() <= 1).all(), (name, k, counts)
            several = counts[counts.sum(axis=1) >= 2]
            assert (several > 0).all(axis=None), (name, k, several)
        assert abs(len(parts(pool)["validation"]) - len(pool) / 2) <= max(2, 0.05 * len(pool)), name  # about half


def test_split_labels_are_the_same_in_a_smaller_profile(default, smoke):
    for name in curate.EVAL_SETS:
        small, big = smoke.sets[name], default.sets[name]
        assert small[["id", "split"]].equals(big[["id", "split"]].head(len(small))), name


def test_the_split_is_the_rule_applied_to_the_seeded_pool_order(default):
    other = build("default", seed=1)
    for cur in (default, other):
        for name in curate.EVAL_SETS:
            assert cur.pools[name]["split"].tolist() == splits.assign_splits(cur.pools[name]["category"]), name
    labels = [dict(zip(cur.pools["t2_harmbench"]["id"], cur.pools["t2_harmbench"]["split"])) for cur in (default, other)]
    assert labels[0].keys() == labels[1].keys() and labels[0] != labels[1]  # another seed: the same items split anew


def test_assign_splits_alternates_within_categories_and_balances_new_ones():
    assert splits.assign_splits("aaaa") == ["validation", "test", "validation", "test"]
    assert splits.assign_splits("abab") == ["validation", "test", "test", "validation"]
    # c starts where the parts are short (test: 1 of 3 so far)
    assert splits.assign_splits("abac") == ["validation", "test", "test", "validation"]
    assert splits.assign_splits([]) == []
    assert splits.assign_splits([float("nan"), float("nan")]) == ["validation", "test"]  # one missing category


def test_the_manifest_counts_each_part(default):
    from tu_lib.stages import curate as stage01

    table = stage01.summary_table(default).set_index("set")
    for name in curate.EVAL_SETS:
        row = table.loc[name]
        assert row["n_validation"] + row["n_test"] == row["n"] and row["n_validation"] and row["n_test"], name
        assert stage01.split_counts(default, name) == {"n_validation": int(row["n_validation"]), "n_test": int(row["n_test"])}
    assert stage01.split_counts(default, "forget") == {}
