"""The organism's forward-only hot paths besides generation, against the machine's limit, at several batch sizes.

Run on demand (not a test), from the repository root:
    TU_PROGRESS=0 .venv/bin/python benchmarks/bench_hot_paths.py          # ~4 minutes on 2 cores

A profile of stage 03's training curve (base + five checkpoints of one method, cProfile) put 70% of its time in
generation (benchmarks/bench_generate.py), 25% in continuation scoring (the fluency judge and TruthfulQA MC1, both
`models.likelihood.continuation_logprobs`) and the rest in the sentence encoders; stage 05 adds hidden-state
collection (`analysis.repgap.hidden_states`, 134 s of its 6 minutes). This benchmark measures the two forward-only
paths the same way as the generation benchmark, float32, in one process:
- the float32 GEMM ceiling at the model's shapes (bench_generate.gemm_ceiling);
- `continuation`: the fluency judge's work, 48 T3 jailbreak prompts (the longest, ~280 tokens) each with 5
  continuations of up to 32 tokens (benign generated sentences), at prompt batch sizes 4, 8 (the judges' setting),
  16 and 32;
- `hidden_states`: stage 05's collection, 48 SafeBench-phrase instructions under its four matched conditions (text,
  typographic image, text beside a blank or a noise image), every decoder layer's last position, at batch sizes 16
  (the stage's former setting), 32, 48 (its setting now) and 64;
each as seconds, useful GFLOP/s and share of the ceiling, and the largest difference of its numbers from the first
setting's (the same float32 arithmetic on other batch shapes: rounding only).

Useful FLOPs are counted analytically, as in bench_generate: every prompt and continuation token through the decoder
layers' linear maps (2 x P_layers each), the LM head (2 x P_head) only where a log-probability is read (the prompt's
last position and every continuation token but the last); padding, attention scores, the vision tower and the
projector are not counted. Only counts and times are printed, never benchmark text. The last line is JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_generate import _rows, gemm_ceiling, matmul_params  # noqa: E402
from tu_lib.analysis.repgap import hidden_states, matched_inputs  # noqa: E402
from tu_lib.models import load_vlm  # noqa: E402
from tu_lib.models.likelihood import continuation_logprobs  # noqa: E402
from tu_lib.models.presets.micro import neutral_corpus  # noqa: E402


def _texts(name: str, key: str, n: int) -> tuple[list[str], str]:
    """n texts of stage 01's set `name` (field `key`), or neutral generated sentences when runs/01_data is missing."""
    path = ROOT / "runs" / "01_data" / "sets" / f"{name}.jsonl"
    if path.is_file():
        return [r[key] for r in _rows(path, n)], f"runs/01_data ({name})"
    corpus = neutral_corpus()
    return [corpus[i % len(corpus)] for i in range(n)], "neutral generated prompts (runs/01_data missing)"


def continuation_inputs(vlm, n: int, options: int = 5, tokens: int = 32):
    tok = vlm.processor.tokenizer
    prompts, source = _texts("t3_jailbreak", "prompt", n)
    prompts = [tok(vlm.chat(p, False), add_special_tokens=False)["input_ids"] for p in prompts]
    corpus = neutral_corpus()
    conts = [[tok(corpus[(i * options + k) % len(corpus)], add_special_tokens=False)["input_ids"][:tokens]
              for k in range(options)] for i in range(n)]
    return prompts, conts, source


def continuation_flop(p_layers: int, p_head: int, prompts, conts) -> float:
    prompt_tokens = sum(len(p) for p in prompts)
    cont_tokens = sum(len(c) for cs in conts for c in cs)
    n_conts = sum(1 for cs in conts for c in cs if c)
    # a continuation's last token is never fed (nothing after it is scored); the head runs at the prompt's last
    # position and at every fed continuation position
    return 2 * p_layers * (prompt_tokens + cont_tokens - n_conts) + 2 * p_head * (len(prompts) + cont_tokens - n_conts)


def hidden_inputs(vlm, n: int):
    phrases, source = _texts("v1_figstep", "image_text", n)
    inputs = matched_inputs(vlm, phrases)
    texts = [t for c in inputs.values() for t in c[0]]
    images = [im for c in inputs.values() for im in c[1]]
    return texts, images, source


def prompt_tokens(vlm, texts, images) -> int:
    total = 0
    for text, image in zip(texts, images):
        if image is None:
            total += len(vlm.processor.tokenizer(text, add_special_tokens=False)["input_ids"])
        else:
            total += int(vlm.processor(text=[text], images=[image], return_tensors="pt")["input_ids"].shape[1])
    return total


def sweep(name: str, run, sizes, flop: float, ceiling: float, repeats: int, flatten) -> list[dict]:
    """Each batch size timed (the best of `repeats`), with its largest difference from the first size's numbers."""
    out, first = [], None
    for size in sizes:
        best, result = float("inf"), None
        for _ in range(repeats):
            t0 = time.perf_counter()
            result = run(size)
            best = min(best, time.perf_counter() - t0)
        values = flatten(result)
        first = values if first is None else first
        rate = flop / best / 1e9
        row = {"path": name, "batch_size": size, "seconds": round(best, 2), "gflops": round(rate, 1),
               "share_of_ceiling": round(rate / ceiling, 3), "max_abs_diff": float(np.max(np.abs(values - first)))}
        out.append(row)
        print(f"{name:<14} batch {size:>3}: {best:6.1f} s, {rate:5.1f} useful GFLOP/s, {rate / ceiling:4.0%} of the "
              f"ceiling; max |difference| from batch {sizes[0]}: {row['max_abs_diff']:.2g}", flush=True)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=48, help="prompts (continuation) and instructions (hidden states); default 48")
    ap.add_argument("--repeats", type=int, default=1, help="runs per setting; the fastest counts")
    args = ap.parse_args(argv)
    if args.n < 2:
        ap.error("--n must be at least 2")

    vlm = load_vlm("organism", dtype="float32")
    p_layers, p_head = matmul_params(vlm)
    ceiling = gemm_ceiling(vlm)
    print(f"organism float32, torch threads {torch.get_num_threads()}; GEMM ceiling at the model's shapes "
          f"{ceiling:.1f} GFLOP/s")

    prompts, conts, c_source = continuation_inputs(vlm, args.n)
    c_flop = continuation_flop(p_layers, p_head, prompts, conts)
    print(f"continuation: {len(prompts)} prompts from {c_source}, mean {np.mean([len(p) for p in prompts]):.0f} tokens, "
          f"{sum(len(c) for c in conts)} continuations; {c_flop / 1e9:.0f} useful GFLOP")
    pad = vlm.processor.tokenizer.pad_token_id
    rows = sweep("continuation",
                 lambda b: continuation_logprobs(vlm.model, prompts, conts, batch_size=b, pad_id=pad),
                 [8, 4, 16, 32], c_flop, ceiling, args.repeats,
                 lambda lps: np.concatenate([lp for row in lps for lp in row]))

    texts, images, h_source = hidden_inputs(vlm, args.n)
    h_flop = 2 * p_layers * prompt_tokens(vlm, texts, images)
    layers = list(range(len(vlm.decoder_layers())))
    print(f"hidden_states: {len(texts)} inputs ({args.n} instructions from {h_source} x 4 conditions), "
          f"{len(layers)} layers; {h_flop / 1e9:.0f} useful GFLOP")
    rows += sweep("hidden_states", lambda b: hidden_states(vlm, texts, images, layers, batch_size=b),
                  [16, 32, 48, 64], h_flop, ceiling, args.repeats, lambda h: h.reshape(-1))

    best = {p: min((r for r in rows if r["path"] == p), key=lambda r: r["seconds"]) for p in ("continuation", "hidden_states")}
    summary = {"n": args.n, "dtype": "float32", "torch_threads": torch.get_num_threads(), "repeats": args.repeats,
               "gemm_ceiling_gflops": round(ceiling, 1), "continuation_source": c_source, "hidden_source": h_source,
               "runs": rows, "fastest": {p: r["batch_size"] for p, r in best.items()}}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
