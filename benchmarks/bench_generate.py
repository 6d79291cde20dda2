"""Greedy generation on the organism against the machine's limit: today's path vs the new one, identical outputs?

Run on demand (not a test), from the repository root:
    TU_PROGRESS=0 .venv/bin/python benchmarks/bench_generate.py            # 192 inputs, batch 16 vs 48, 32 new tokens
    TU_PROGRESS=0 .venv/bin/python benchmarks/bench_generate.py --bf16     # also the new path in bfloat16
    OMP_NUM_THREADS=1 TU_PROGRESS=0 .venv/bin/python benchmarks/bench_generate.py --repeats 2  # a loaded machine

In one process it measures
- the float32 GEMM ceiling at the model's shapes: `F.linear` over one decoder layer's seven weights (q, k, v,
  o, gate, up, down) on 512 rows, i.e. what the language model's matrix multiplies reach when nothing else
  limits them (`gemm_ceiling`);
- today's path, `generate_reference` (`model.generate` over left-padded batches sorted by length), and the
  new path, `generate` (the greedy loop: shared prefix cache, logits for the last position only, finished
  rows leave the batch, KV caches appended in place), each as seconds per item, useful GFLOP/s and share of the ceiling;
- whether the two give identical greedy outputs, item by item (and optionally `--per-sample` too);
- with `--bf16`, the new path with the model in bfloat16 (the fast mode of CPUs with AVX512-BF16 or AMX, and of
  GPUs): its seconds per item and how many greedy outputs differ from float32's.
Today's path runs at the stages' former batch size (16), the new path at theirs now (48, the fastest of 16-96 on
192 inputs here).

Useful FLOPs (`useful_flop`) are counted analytically from the token counts, the same for both paths:
    2 * P_layers * sum_i (L_i + G_i - 1)  +  2 * P_head * sum_i G_i
where L_i is item i's prompt length in tokens (image placeholders expanded, the shared chat prefix counted
in every item), G_i the answer's tokens including the EOS step (capped at max_new_tokens; the answer is
re-tokenized, so a merge across a special token can shift it by one), P_layers the weights of the decoder
layers' linear maps and P_head those of the LM head: every prompt and answer position goes through the
layers except the last answer token, which is never fed back, and only positions that choose a token need
the head. Padding, post-EOS steps, attention scores (which grow with the context), the vision tower and the
projector are not counted; the prefix reuse of the new path is credited as useful work (the JSON also gives
the rate with the prefix counted once per call, `new_gflops_prefix_once`).

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
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tu_lib.models import load_vlm
from tu_lib.models.generate import _common_prefix, generate, generate_per_sample, generate_reference  # noqa: E402
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


def prompt_lengths(vlm, texts, images) -> list[int]:
    """Tokens each prompt puts through the language model (image placeholders expanded)."""
    out = []
    for text, image in zip(texts, images):
        if image is None:
            out.append(len(vlm.processor.tokenizer(text, add_special_tokens=False)["input_ids"]))
        else:
            out.append(int(vlm.processor(text=[text], images=[image], return_tensors="pt")["input_ids"].shape[1]))
    return out


def answer_lengths(vlm, answers, max_new_tokens: int) -> list[int]:
    """Decode steps each answer needed: its tokens plus the EOS step, capped at max_new_tokens."""
    tok = vlm.processor.tokenizer
    return [min(len(tok(a, add_special_tokens=False)["input_ids"]) + 1, max_new_tokens) for a in answers]


def matmul_params(vlm) -> tuple[int, int]:
    """(weights of the decoder layers' linear maps, weights of the LM head)."""
    layers = sum(m.weight.numel() for layer in vlm.decoder_layers() for m in layer.modules()
                 if isinstance(m, torch.nn.Linear))
    return layers, vlm.model.lm_head.weight.numel()


def useful_flop(p_layers: int, p_head: int, prompt_len, answer_len) -> float:
    return 2 * p_layers * sum(L + G - 1 for L, G in zip(prompt_len, answer_len)) + 2 * p_head * sum(answer_len)


@torch.inference_mode()
def gemm_ceiling(vlm, rows: int = 512, seconds: float = 0.5, repeats: int = 6) -> float:
    """GFLOP/s of `F.linear` over one decoder layer's linear weights on `rows` rows: the float32 matrix-multiply
    rate this machine reaches at the model's shapes, the ceiling of any generation path. The best of
    `repeats` windows, so a moment of load on a shared machine does not lower the ceiling."""
    weights = [m.weight for m in vlm.decoder_layers()[0].modules() if isinstance(m, torch.nn.Linear)]
    x = {w.shape[1]: torch.randn(rows, w.shape[1], dtype=w.dtype, device=w.device) for w in weights}
    flop = sum(2 * rows * w.numel() for w in weights)
    for w in weights:  # warm-up
        F.linear(x[w.shape[1]], w)
    best = 0.0
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for w in weights:
                F.linear(x[w.shape[1]], w)
            n += 1
        best = max(best, flop * n / (time.perf_counter() - t0) / 1e9)
    return best


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=192, help="number of inputs (half text, half image); default 192")
    ap.add_argument("--batch-size", type=int, default=16, help="today's path; default 16 (the stages' setting)")
    ap.add_argument("--new-batch-size", type=int, default=48, help="the new path; default 48 (the stages' setting)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs of each path, alternating; the fastest counts (a shared machine's load varies)")
    ap.add_argument("--per-sample", action="store_true", help="also run the one-prompt-at-a-time loop (slow)")
    ap.add_argument("--bf16", action="store_true", help="also run the new path with the model in bfloat16")
    args = ap.parse_args(argv)
    if args.n < 2:
        ap.error("--n must be at least 2")

    t0 = time.perf_counter()
    vlm = load_vlm("organism", dtype="float32")
    load_s = time.perf_counter() - t0
    texts, images, source = inputs(vlm, args.n)
    n_text = sum(im is None for im in images)
    print(f"organism loaded in {load_s:.1f} s; {len(texts)} inputs from {source}; torch threads {torch.get_num_threads()}")

    kw = dict(max_new_tokens=args.max_new_tokens)
    new_batch = args.new_batch_size
    ref_s = new_s = float("inf")
    ceiling = 0.0
    for _ in range(max(1, args.repeats)):  # alternating, so a change of load hits both paths alike
        ceiling = max(ceiling, gemm_ceiling(vlm))  # measured beside the runs: the best of all windows counts
        reference, secs = timed(generate_reference, vlm.model, vlm.processor, texts, images,
                                batch_size=args.batch_size, desc="today", **kw)
        ref_s = min(ref_s, secs)
        new, secs = timed(generate, vlm.model, vlm.processor, texts, images, batch_size=new_batch, desc="new", **kw)
        new_s = min(new_s, secs)

    ceiling = max(ceiling, gemm_ceiling(vlm))
    print(f"float32 GEMM ceiling at the model's shapes: {ceiling:.1f} GFLOP/s")
    p_layers, p_head = matmul_params(vlm)
    prompt_len = prompt_lengths(vlm, texts, images)
    flop = useful_flop(p_layers, p_head, prompt_len, answer_lengths(vlm, reference, args.max_new_tokens))
    n_prefix = len(_common_prefix(vlm.model, vlm.processor, texts))
    flop_prefix_once = flop - 2 * p_layers * n_prefix * (len(texts) - 1)
    differ = [i for i, (a, b) in enumerate(zip(reference, new)) if a != b]
    summary = {
        "n": len(texts), "n_text": n_text, "n_image": len(texts) - n_text, "source": source,
        "batch_size": args.batch_size, "new_batch_size": new_batch, "max_new_tokens": args.max_new_tokens, "dtype": "float32",
        "torch_threads": torch.get_num_threads(), "repeats": max(1, args.repeats), "load_s": round(load_s, 2), "gemm_ceiling_gflops": round(ceiling, 1),
        "useful_gflop": round(flop / 1e9, 1), "shared_prefix_tokens": n_prefix,
        "mean_prompt_tokens": round(sum(prompt_len) / len(texts), 1),
    }
    for name, secs in (("today", ref_s), ("new", new_s)):
        rate = flop / secs / 1e9
        summary.update({f"{name}_s_per_item": round(secs / len(texts), 4), f"{name}_gflops": round(rate, 1),
                        f"{name}_share_of_ceiling": round(rate / ceiling, 3)})
        print(f"{name}: {secs / len(texts):.3f} s per item, {rate:.1f} useful GFLOP/s, {rate / ceiling:.0%} of the ceiling")
    summary["new_gflops_prefix_once"] = round(flop_prefix_once / new_s / 1e9, 1)
    summary.update({"speedup": round(ref_s / new_s, 2), "identical": not differ, "n_differ": len(differ),
                    "n_differ_text": sum(i < n_text for i in differ), "n_differ_image": sum(i >= n_text for i in differ)})
    print(f"new path {summary['speedup']}x faster per item; {len(differ)} of {len(texts)} greedy outputs differ")
    if args.per_sample:
        single, single_s = timed(generate_per_sample, vlm.model, vlm.processor, texts, images, desc="per sample", **kw)
        summary.update({"per_sample_s_per_item": round(single_s / len(texts), 4),
                        "n_differ_per_sample": sum(a != b for a, b in zip(single, new))})
        print(f"per sample: {single_s / len(texts):.3f} s per item; {summary['n_differ_per_sample']} outputs differ from the new path")
    if args.bf16:
        vlm.model.to(torch.bfloat16)
        half, half_s = timed(generate, vlm.model, vlm.processor, texts, images, batch_size=new_batch, desc="bf16", **kw)
        vlm.model.to(torch.float32)
        summary.update({"bf16_s_per_item": round(half_s / len(texts), 4), "bf16_speedup_vs_new": round(new_s / half_s, 2),
                        "n_differ_bf16": sum(a != b for a, b in zip(half, new))})
        print(f"bf16: {half_s / len(texts):.3f} s per item ({summary['bf16_speedup_vs_new']}x the float32 new path); "
              f"{summary['n_differ_bf16']} of {len(texts)} greedy outputs differ from float32")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
