"""Design the organism on the validation split: build a variant, measure it on validation, print its bars.

    .venv/bin/python scripts/organism_dev.py NAME [--reuse OTHER] [--set field=value ...]

Builds into runs/organism_dev/NAME (BuildConfig fields from --set; `--reuse OTHER` takes the steps whose fields
agree from runs/organism_dev/OTHER), then writes validation.json there and prints every bar on validation. The test
split is never touched here: stage 00 reports it once, for the chosen build (docs/ORGANISM_ATTEMPTS.md)."""
from __future__ import annotations

import argparse
import ast
import json
import time
from dataclasses import fields, replace

from tu_lib.core.files import write_json
from tu_lib.core.paths import runs_dir
from tu_lib.models.presets.organism import load_organism_model
from tu_lib.stages import organism as stage
from tu_lib.training.organism import BuildConfig, build, cfg_from_dict, organism_sets


def parse_set(items: list[str]) -> dict:
    known = {f.name for f in fields(BuildConfig)}
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in known:
            raise SystemExit(f"unknown BuildConfig field {key!r}; known: {', '.join(sorted(known))}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def print_bars(measured: dict) -> None:
    for row in stage.v4_bar_table(measured):
        flag = {True: "ok", False: "MISS", None: ""}[row["meets_bar"]]
        print(f"{row['property']:<44} {row['value']:>7.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}] n={row['n']:<4} "
              f"{row['bar']:<28} {flag}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name")
    ap.add_argument("--reuse", default=None, help="an earlier variant's name whose matching steps are reused")
    ap.add_argument("--set", nargs="*", default=[], help="BuildConfig field=value")
    ap.add_argument("--measure-only", action="store_true", help="measure an existing build again")
    ap.add_argument("--unseen", action="store_true",
                    help="also measure the unseen-source split (pyrit objectives; a check, never a design input)")
    args = ap.parse_args()
    root = runs_dir() / "organism_dev"
    parts = root / args.name
    cfg = replace(BuildConfig(), **parse_set(args.set))
    t = time.time()
    if not args.measure_only:
        info = build(cfg, parts, reuse=root / args.reuse if args.reuse else None)
        print("build timings (s):", {k: round(v) for k, v in info["timings"].items()}, flush=True)
    else:
        cfg = cfg_from_dict(json.loads((parts / "build.json").read_text())["config"])
    model, processor, tok = load_organism_model(parts)
    judge, calibration = stage.calibrated_judge(parts)
    data = organism_sets(cfg)
    measured = stage.measure_split(model, processor, tok, data, "validation", judge, cfg.eval_tokens)
    facts = json.loads((parts / "build.json").read_text())["facts"]
    measured["reading"] = {k: facts.get(k) for k in ("patch_accuracy", "vocab_coverage")}
    measured["on_topic_calibration"] = calibration
    write_json(parts / "validation.json", measured)
    print_bars(measured)
    if args.unseen:
        unseen = stage.measure_split(model, processor, tok, data, "unseen", judge, cfg.eval_tokens)
        write_json(parts / "unseen.json", unseen)
        print("unseen source:")
        print_bars(unseen)
    print("reading:", json.dumps(measured["reading"]))
    print(f"total {time.time() - t:.0f} s")


if __name__ == "__main__":
    main()
