"""Stage 01 — data curation (data.curation's logic) written with its manifest, tables and figure."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from ..core import plots
from ..core.files import atomic_dir, sha256_file, write_csv, write_json, write_jsonl
from ..core.params import resolve_path
from ..core.records import run_record
from ..data.curation import (EVAL_SETS, NOTEBOOK, ROLE, SET_NAMES, SETS, SPEC, Curation, build, check_inputs,
                             overlap_table)
from ..data.splits import SPLITS
from ..render import pages as render

__all__ = ["split_counts", "summary_table", "category_table", "FIGURE", "write_outputs", "run", "SPEC", "build",
           "check_inputs", "overlap_table"]




# ---- outputs ----------------------------------------------------------------------------------------


def split_counts(cur: Curation, name: str) -> dict:
    """{"n_validation", "n_test"} of an evaluation or utility set; {} for the training-side sets (not split)."""
    if name not in EVAL_SETS:
        return {}
    return {f"n_{s}": int((cur.sets[name]["split"] == s).sum()) for s in SPLITS}


def summary_table(cur: Curation) -> pd.DataFrame:
    desc = {n: d for n, _, _, d in SETS}
    return pd.DataFrame([{"set": n, "role": ROLE[n], "n": len(cur.sets[n]), **split_counts(cur, n),
                          "pool": len(cur.pools[n]),
                          "sources": "+".join(sorted(cur.sets[n]["source"].unique())) if len(cur.sets[n]) else "",
                          "what": desc[n]} for n in SET_NAMES])


def category_table(cur: Curation) -> pd.DataFrame:
    rows = []
    for n in ("t1_advbench", "t2_harmbench", "t3_jailbreak", "v1_figstep", "v2_mmsb_typo", "v3_prompts"):
        for cat, k in cur.sets[n]["category"].value_counts().sort_index().items():
            rows.append({"set": n, "category": cat, "n": int(k)})
    return pd.DataFrame(rows, columns=["set", "category", "n"])


def _render_images(cur: Curation, out: Path) -> dict:
    """Render V1 (FigStep) and V2 (MM-SafetyBench typography) images; returns the font used per set."""
    fonts = {}
    for name, fn in (("v1_figstep", render.render_figstep), ("v2_mmsb_typo", render.render_mmsafetybench_typo)):
        df = cur.sets[name]
        (out / "images" / name).mkdir(parents=True, exist_ok=True)
        paths = []
        for _, row in df.iterrows():
            rel = f"images/{name}/{row['id'].replace(':', '_')}.png"
            image = fn(row["image_text"])
            image.save(out / rel)
            paths.append(rel)
            fonts[name] = {"font": image.info.get("font"), "exact": image.info.get("font_exact")}
        cur.sets[name] = df.assign(image=paths)
    return fonts


FIGURE = "01_data_counts"


def write_outputs(cur: Curation, started: float) -> dict:
    """Write sets, images, manifest and run record atomically (all of it or nothing), then the figure."""
    P = cur.params
    with atomic_dir(resolve_path(P["out_dir"]), stage=NOTEBOOK) as out:  # never a user's folder: it is replaced
        fonts = _render_images(cur, out) if P["render_images"] else {}
        (out / "sets").mkdir()
        files = {}
        for name in SET_NAMES:
            path = out / "sets" / f"{name}.jsonl"
            write_jsonl(path, (dict((k, v) for k, v in r.items() if not (isinstance(v, float) and np.isnan(v)))
                               for r in cur.sets[name].to_dict("records")))
            files[name] = sha256_file(path)
        summary = summary_table(cur)
        write_csv(summary, out / "summary.csv")
        write_csv(pd.DataFrame(cur.dropped), out / "dropped.csv")
        overlaps = overlap_table(cur.sets)
        manifest = {
            "stage": NOTEBOOK, "seed": P["seed"], "profile": P["profile"],
            "sets": {n: {"role": ROLE[n], "n": len(cur.sets[n]), **split_counts(cur, n), "pool": len(cur.pools[n]),
                         "file": f"sets/{n}.jsonl", "sha256": files[n],
                         "sources": sorted(cur.sets[n]["source"].unique().tolist()) if len(cur.sets[n]) else []}
                     for n in SET_NAMES},
            "dropped": {"exact_duplicate": sum(d["reason"] == "exact duplicate" for d in cur.dropped),
                        "near_duplicate": sum(d["reason"] != "exact duplicate" for d in cur.dropped)},
            "max_shared_texts_between_sets": int(overlaps["shared"].max()),
            "fonts": fonts,
        }
        write_json(out / "manifest.json", manifest)
        write_json(out / "run_record.json", run_record(P, cur.inputs, started, seeds={"split": P["seed"]}))
    counts = summary[["set", "role", "n"]]
    fig = plots.set_counts_figure(counts, category_table(cur))
    plots.save_figure(fig, counts.merge(category_table(cur), on="set", how="left", suffixes=("", "_category")),
                      FIGURE, resolve_path(P["fig_dir"]))
    return manifest


def run(P: dict) -> tuple[Curation, dict]:
    """The whole stage: verify inputs, build pools, size the sets, write everything."""
    started = time.time()
    cur = build(P, check_inputs(P))
    manifest = write_outputs(cur, started)
    return cur, manifest
