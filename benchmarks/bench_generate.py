"""Batched vs per-sample greedy generation on the organism: wall time, speed-up, identical outputs?

Run on demand (not a test), from the repository root, e.g. pinned to one core:
    OMP_NUM_THREADS=1 TU_PROGRESS=0 taskset -c 1 .venv/bin/python benchmarks/bench_generate.py --n 16

Inputs: half text prompts (the first of runs/01_data/sets/t1_advbench.jsonl), half V1 FigStep items
(the instruction rendered in the organism's typography + FigStep's benign text prompt), or neutral
generated prompts when runs/01_data is missing. Only counts and times are printed, never the
benchmark text or the model's answers (harmful by design). The last line is a JSON summary.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tu_lib.models import load_vlm
from tu_lib.models.generate import generate, generate_per_sample  # noqa: E402
from tu_lib.models.presets.micro import neutral_corpus  # noqa: E402
from tu_lib.render.pages import FIGSTEP_TEXT_PROMPT  # noqa: E402


def _rows(path: Path, n: int) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line, _ in zip(f, range(n))]


def inputs(vlm, n: int) -> tuple[list[str], list, str]:
    """(texts, images, source): n // 2 text items, the rest image items."""
    n_text, n_image = n // 2, n - n // 2
    sets = ROOT / "runs" / "01_data" / "sets"
    if (sets / "t1_advbench.jsonl").is_file() and (sets / "v1_figstep.jsonl").is_file():
        prompts = [r["prompt"] for r in _rows(sets / "t1_advbench.jsonl", n_text)]
        titles = [r["image_text"] for r in _rows(sets / "v1_figstep.jsonl", n_image)]
        source = "runs/01_data (t1_advbench, v1_figstep)"
    else:
        corpus = neutral_corpus()
        prompts = corpus[:n_text]
        titles = [f"Steps to {s.split(' ', 2)[-1].rstrip('.')}." for s in corpus[n_text:n_text + n_image]]
        source = "neutral generated prompts (runs/01_data missing)"
    texts = [vlm.chat(p, False) for p in prompts] + [vlm.chat(FIGSTEP_TEXT_PROMPT, True)] * len(titles)
    images = [None] * len(prompts) + [vlm.render(t, "figstep") for t in titles]
    return texts, images, source


def lm_tokens(vlm, texts, images, answers) -> int:
    """Tokens the language model processes: prompts (image placeholders expanded) plus generated tokens."""
    n = 0
    for text, image, answer in zip(texts, images, answers):
        if image is None:
            n += len(vlm.processor.tokenizer(text, add_special_tokens=False)["input_ids"])
        else:
            n += int(vlm.processor(text=[text], images=[image], return_tensors="pt")["input_ids"].shape[1])
        n += len(vlm.processor.tokenizer(answer, add_special_tokens=False)["input_ids"])
    return n


def gemm_gflops(rows: int = 512, seconds: float = 2.0) -> float:
    """fp32 matrix-multiply rate of this machine on the organism's layer shapes (576 -> 1536): the ceiling
    of batched decoding on a CPU, where a batch turns matrix-vector work into matrix-matrix work."""
    a, b = torch.randn(rows, 576), torch.randn(576, 1536)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * rows * 576 * 1536 * n / (time.perf_counter() - t0) / 1e9


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=64, help="number of inputs (half text, half image); default 64")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args(argv)
    if args.n < 2:
        ap.error("--n must be at least 2")

    t0 = time.perf_counter()
    vlm = load_vlm("organism", dtype="float32")
    load_s = time.perf_counter() - t0
    texts, images, source = inputs(vlm, args.n)
    print(f"organism loaded in {load_s:.1f} s; {len(texts)} inputs from {source}; torch threads {torch.get_num_threads()}")

    t0 = time.perf_counter()
    batched = generate(vlm.model, vlm.processor, texts, images, max_new_tokens=args.max_new_tokens,
                       batch_size=args.batch_size, desc="batched")
    batched_s = time.perf_counter() - t0
    print(f"batched (batch {args.batch_size}): {batched_s:.1f} s")
    t0 = time.perf_counter()
    single = generate_per_sample(vlm.model, vlm.processor, texts, images, max_new_tokens=args.max_new_tokens,
                                 desc="per sample")
    single_s = time.perf_counter() - t0
    print(f"per sample: {single_s:.1f} s")

    differ = [i for i, (a, b) in enumerate(zip(batched, single)) if a != b]
    n_text = sum(im is None for im in images)
    summary = {
        "n": len(texts), "n_text": n_text, "n_image": len(texts) - n_text, "source": source,
        "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "dtype": "float32",
        "torch_threads": torch.get_num_threads(), "load_s": round(load_s, 2),
        "batched_s": round(batched_s, 2), "per_sample_s": round(single_s, 2),
        "speedup": round(single_s / batched_s, 2), "n_differ": len(differ),
        "n_differ_text": sum(i < n_text for i in differ), "n_differ_image": sum(i >= n_text for i in differ),
    }
    # Where the speed-up stops: ~2 FLOPs per LM weight per token. Per sample, every weight is read from
    # memory once per token (memory-bound); batched, the matrix multiplies run near the GEMM rate.
    lm_params = sum(p.numel() for n, p in vlm.model.named_parameters() if "language_model" in n or "lm_head" in n)
    gflop = 2 * lm_params * lm_tokens(vlm, texts, images, single) / 1e9
    summary.update({"lm_gflop": round(gflop, 1), "per_sample_gflops": round(gflop / single_s, 1),
                    "batched_gflops": round(gflop / batched_s, 1), "gemm_gflops": round(gemm_gflops(), 1)})
    summary["speedup_ceiling"] = round(summary["gemm_gflops"] / summary["per_sample_gflops"], 1)
    print(f"compute: ~{gflop:.0f} GFLOP in the LM; per sample {summary['per_sample_gflops']} GFLOP/s, batched "
          f"{summary['batched_gflops']} GFLOP/s, fp32 GEMM rate of this machine {summary['gemm_gflops']} GFLOP/s "
          f"-> the speed-up cannot much exceed ~{summary['speedup_ceiling']}x here")
    print(f"speed-up {summary['speedup']}x; {len(differ)} of {len(texts)} outputs differ")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
