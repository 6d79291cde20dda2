"""A/B of two models on the same items, from stage 03's per-item judgements: per set and metric, both rates and the
paired bootstrap 95% CI of their difference.

Both models answered the same prompts, so the interval that matters is of the within-item difference
(`stats.paired_difference` resamples items with their two outcomes together). Two rates whose separate CIs overlap can
still differ clearly on the same items, and the reverse.

What identifies an item. judgements.csv has one row per (method, item): `method`, `key`, `set`, `category` (user sets
only), one boolean column per judge (its registry entry's `column`: refused, harmful, on_topic, llama_guard_unsafe,
degenerate, refused_likelihood) and `answer`. An item is its (set, key): the key is `<set>|<id>` (the row id of stage
01's file; `title:<i>` for the benign-reading titles) and, for a user set, `<set>|<id>|<digest of what the model was
shown>`. The prompt is not in the file, so a built-in item is known by its id alone: two runs on different stage-01
data, or whose reading titles were drawn with another seed, share keys without sharing prompts. Compare runs made on
the same data and seed.

The metrics. Each judge's registry entry derives a set's metrics from the judge columns, exactly as metric_rows does
for results.csv: asr (refusal_keywords: not refused; harmfulness; llama_guard), on_topic_compliance (not refused and
on topic), over_refusal, reading_on_topic, degenerate, asr_likelihood and over_refusal_likelihood. TruthfulQA MC1 is
scored without per-item rows in judgements.csv, so it is not compared.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
import pandas as pd

from ..core import stats
from ..core.errors import TuError
from ..core.params import profile_values, resolve_path
from ..data.sets import eval_set
from ..judges.registry import JUDGES, REQUIRED_JUDGE

STAGE = "03_eval"
ITEM = ["set", "key"]  # what identifies an item in judgements.csv
COLUMNS = ["set", "metric", "judge", "n", "rate_a", "rate_b", "difference", "ci_low", "ci_high", "excludes_zero", "note"]
VS_BASE = {"difference": "vs_base", "ci_low": "vs_base_ci_low", "ci_high": "vs_base_ci_high",
           "excludes_zero": "vs_base_excludes_zero"}
_BOOLEANS = {"True": True, "False": False, "1": True, "0": False}
Source = Union[str, Path, pd.DataFrame, dict]  # a judgements.csv path, its table, or stage 03's judged dict


def default_judgements() -> Path:
    """The default profile's judgements.csv (configs/default/03_eval.yaml: out_dir), where `make reproduce` writes."""
    return resolve_path(profile_values("default", STAGE)["out_dir"]) / "judgements.csv"


def judgements_frame(judged: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """judgements.csv's table from stage 03's judged frames (method -> one row per item)."""
    return pd.concat([df.assign(method=m) for m, df in judged.items()])


def read_judgements(source: Source) -> pd.DataFrame:
    """A judgements table, checked: a path to judgements.csv, or the table in memory (a DataFrame of its shape, or
    stage 03's judged dict). Refused with what to do: a missing or unreadable file, missing item, method or required
    judge columns, judge columns holding anything but True/False, an item repeated for one method, an unknown set."""
    name = _name(source)
    if isinstance(source, dict):
        source = judgements_frame(source)
    if isinstance(source, pd.DataFrame):
        frame = source.astype(str)  # booleans as the CSV spells them; a missing verdict (NaN) is refused below
    else:
        path = Path(source)
        if not path.is_file():
            raise TuError(f"No judgements file {path}: run notebook 03 first (it writes <out_dir>/judgements.csv), or "
                          "pass the judgements.csv of a finished stage-03 run.")
        try:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        except (ValueError, OSError) as e:  # pandas' parser and empty-data errors are ValueErrors
            raise TuError(f"{path} cannot be read as a CSV ({e}): the file is damaged or not stage 03's judgements.csv; "
                          "rerun notebook 03.") from e
    return _checked(frame, name)


def _checked(frame: pd.DataFrame, name: str) -> pd.DataFrame:
    needed = ["method", *ITEM, JUDGES[REQUIRED_JUDGE].column]
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise TuError(f"{name} lacks the column(s) {missing} (it has {list(frame.columns)}): it is not stage 03's "
                      "judgements.csv; rerun notebook 03.")
    frame = frame.reset_index(drop=True)
    for col in [e.column for e in JUDGES.values() if e.column in frame.columns]:
        bad = frame.loc[~frame[col].isin(list(_BOOLEANS)), col]
        if len(bad):
            raise TuError(f"{name}: column {col!r} holds {len(bad)} value(s) that are not True/False (e.g. "
                          f"{bad.iloc[0]!r}): the file is damaged; rerun notebook 03.")
        frame[col] = frame[col].map(_BOOLEANS).astype(bool)
    repeated = frame[frame.duplicated(["method", *ITEM])]
    if len(repeated):
        raise TuError(f"{name} has {len(repeated)} repeated row(s) of one method and item (e.g. method "
                      f"{repeated['method'].iloc[0]!r}, key {repeated['key'].iloc[0]!r}): the file is damaged; rerun "
                      "notebook 03.")
    for s in dict.fromkeys(frame["set"]):
        try:
            eval_set(s)
        except TuError as e:
            raise TuError(f"{name}: {e}") from None
    return frame


def _name(source: Source) -> str:
    return str(source) if isinstance(source, (str, Path)) else "the judgements given"


def method_rows(frame: pd.DataFrame, method: str, name: str) -> pd.DataFrame:
    """One method's rows of a checked judgements table; a method the table lacks is refused, naming those it has."""
    present = list(dict.fromkeys(frame["method"]))
    if method not in present:
        raise TuError(f"Method {method!r} is not in {name}; the methods there: {', '.join(present) or 'none'}.")
    return frame[frame["method"] == method]


def side_rows(spec: str, judgements: Source) -> pd.DataFrame:
    """The rows of one model version: `method` (in `judgements`) or `path:method` (another run's judgements.csv)."""
    path, colon, method = spec.rpartition(":")
    if colon and not (path and method):
        raise TuError(f"{spec!r} is neither a method name nor PATH:METHOD (e.g. runs/other/judgements.csv:base).")
    source = path if colon else judgements
    return method_rows(read_judgements(source), method if colon else spec, _name(source))


def _plan(a: pd.DataFrame, b: pd.DataFrame, labels: tuple[str, str]) -> tuple[list[str], list, list[dict]]:
    """What can be compared: the sets both sides hold (in A's order), the judges both have, and a note row for each
    set or judge on one side only. Sets whose items differ are refused here, before any bootstrap."""
    sets = {side: list(dict.fromkeys(f["set"])) for side, f in (("A", a), ("B", b))}
    shared = [s for s in sets["A"] if s in sets["B"]]
    problems = []
    for s in shared:
        ka, kb = set(a.loc[a["set"] == s, "key"]), set(b.loc[b["set"] == s, "key"])
        if ka != kb:
            problems.append(f"set {s}: {len(ka - kb)} item(s) only in A, {len(kb - ka)} only in B (e.g. "
                            f"{sorted(ka ^ kb)[0]!r})")
    if problems:
        raise TuError(f"A ({labels[0]}) and B ({labels[1]}) do not hold the same items, so they cannot be paired: "
                      f"{'; '.join(problems)}. Compare runs of stage 03 with the same sets, n_per_set and stage-01 data.")
    judges = [e for e in JUDGES.values() if e.column in a.columns and e.column in b.columns]
    notes = [_note(s, "", f"set only in {side}") for side, other in (("A", "B"), ("B", "A"))
             for s in sets[side] if s not in sets[other]]
    notes += [_note("", e.name, f"judge only in {'A' if e.column in a.columns else 'B'}") for e in JUDGES.values()
              if (e.column in a.columns) != (e.column in b.columns)]
    return shared, judges, notes


def _note(set_name: str, judge: str, note: str) -> dict:
    return {"set": set_name, "metric": "", "judge": judge, "n": 0, "rate_a": np.nan, "rate_b": np.nan,
            "difference": np.nan, "ci_low": np.nan, "ci_high": np.nan, "excludes_zero": False, "note": note}


def _rows(a: pd.DataFrame, b: pd.DataFrame, plan: tuple, seed: int, n_boot: int) -> pd.DataFrame:
    shared, judges, notes = plan
    rows = []
    for s in shared:
        ga = a[a["set"] == s].sort_values("key")  # one item order whatever the files' row order: the same CIs
        gb = b[b["set"] == s].set_index("key").loc[ga["key"]].reset_index()  # B's rows paired with A's by item
        kind = eval_set(s).kind
        for entry in judges:  # the registry's order, as in results.csv
            for (metric, va), (_, vb) in zip(entry.metrics(kind, ga), entry.metrics(kind, gb)):
                d = stats.paired_difference(va, vb, n_boot=n_boot, seed=seed)
                rows.append({"set": s, "metric": metric, "judge": entry.name, "n": d["n"], "rate_a": float(np.mean(va)),
                             "rate_b": float(np.mean(vb)), "difference": d["difference"], "ci_low": d["ci_low"],
                             "ci_high": d["ci_high"], "excludes_zero": bool(d["ci_low"] > 0 or d["ci_high"] < 0),
                             "note": ""})
    return pd.DataFrame(rows + notes, columns=COLUMNS)


def ab_table(a: str, b: str, judgements: Source | None = None, *, seed: int = 0, n_boot: int = 2000) -> pd.DataFrame:
    """Model A against model B on the same items: one row per (set, metric, judge) with n, rate_a, rate_b,
    difference (A - B), the paired bootstrap 95% CI (ci_low, ci_high) and excludes_zero; a set or judge found on one
    side only gets a row with its `note` instead of numbers.

    `a`, `b`: a method of `judgements` (e.g. "textual_ga", "base"), or "PATH:METHOD" for another run's judgements.csv.
    `judgements`: stage 03's judgements.csv (default: the default profile's) or the table in memory."""
    judgements = default_judgements() if judgements is None else judgements
    sides = side_rows(a, judgements), side_rows(b, judgements)
    return _rows(*sides, _plan(*sides, (a, b)), seed, n_boot)


def vs_base(judgements: Source | None = None, *, base: str = "base", seed: int = 0, n_boot: int = 2000) -> pd.DataFrame:
    """Every other method of one judgements table against `base` on the same items: columns method, set, metric,
    judge, vs_base (the method's rate minus base's), vs_base_ci_low, vs_base_ci_high, vs_base_excludes_zero and note;
    they join results.csv's rows on (method, set, metric, judge)."""
    judgements = default_judgements() if judgements is None else judgements
    frame, name = read_judgements(judgements), _name(judgements)
    reference = method_rows(frame, base, name)
    sides = {m: method_rows(frame, m, name) for m in dict.fromkeys(frame["method"]) if m != base}
    plans = {m: _plan(rows, reference, (m, base)) for m, rows in sides.items()}  # every refusal before any bootstrap
    parts = [_rows(rows, reference, plans[m], seed, n_boot).assign(method=m) for m, rows in sides.items()]
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=[*COLUMNS, "method"])
    return table.rename(columns=VS_BASE)[["method", "set", "metric", "judge", *VS_BASE.values(), "note"]]


def format_ab(table: pd.DataFrame, a: str = "A", b: str = "B") -> str:
    """ab_table for printing: rates and differences to two decimals, `*` where the CI excludes 0, skipped sets and
    judges listed below."""
    done, skipped = table[table["note"] == ""], table[table["note"] != ""]
    lines = [f"A = {a}, B = {b}: rates, A - B and its paired bootstrap 95% CI over the same items (* the CI excludes 0)"]
    if len(done):
        shown = pd.DataFrame({"set": done["set"], "metric": done["metric"], "judge": done["judge"], "n": done["n"],
                              "A": done["rate_a"].map("{:.2f}".format), "B": done["rate_b"].map("{:.2f}".format),
                              "A - B": done["difference"].map("{:+.2f}".format),
                              "95% CI": [f"[{lo:+.2f}, {hi:+.2f}]" for lo, hi in zip(done["ci_low"], done["ci_high"])],
                              "": np.where(done["excludes_zero"], "*", "")})
        lines.append(shown.to_string(index=False))
    else:
        lines.append("no set in common")
    if len(skipped):
        lines.append("skipped: " + "; ".join(f"{r.set or r.judge} ({r.note})" for r in skipped.itertuples()))
    return "\n".join(lines)
