"""Batched, left-padded, greedy generation for any preset (the LLaVA code path serves them all).

Peers' scripts generate one prompt at a time; batching the same greedy decode is several times faster
on CPU with identical outputs in fp32 (GUIDE §7; benchmarks/bench_generate.py measures it).
`generate_jsonl` is the resumable form for long runs: outputs are appended to a JSONL file after every
batch, so an interrupted evaluation restarts where it stopped instead of from zero."""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Sequence

import torch
from tqdm.std import tqdm  # plain bars: tqdm.auto warns about ipywidgets on stderr in notebooks

from ..core.errors import TuError

__all__ = ["generate", "generate_per_sample", "generate_jsonl", "progress_enabled", "weights_fingerprint"]


def progress_enabled() -> bool:
    """Progress bars go to stderr, which nbval compares; TU_PROGRESS=0 turns them off for committed outputs."""
    return os.environ.get("TU_PROGRESS", "1") != "0"


def _plan(texts: Sequence[str], images: Sequence, batch_size: int) -> list[list[int]]:
    """Batches of indices: sorted by length (little padding), text-only and image items never mixed
    (a batch's pixel_values must match its placeholders), text-only batches first."""
    order = sorted(range(len(texts)), key=lambda i: (images[i] is None, len(texts[i])))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    batches = [[i for i in b if images[i] is None] for b in batches] + [[i for i in b if images[i] is not None] for b in batches]
    return [b for b in batches if b]


@torch.inference_mode()
def _generate_batch(model, processor, texts: list[str], images: list | None, max_new_tokens: int) -> list[str]:
    """One left-padded greedy batch; `images` is None for a text-only batch. Every public function
    below decodes through here, so batched, per-sample and resumable runs share one decoding setup."""
    tok = processor.tokenizer
    tok.padding_side = "left"
    if images is not None:
        enc = processor(text=texts, images=images, return_tensors="pt", padding=True)
    else:
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    enc = {k: v.to(model.device) for k, v in enc.items()}
    if "pixel_values" in enc:
        enc["pixel_values"] = enc["pixel_values"].to(model.dtype)
    gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                         pad_token_id=tok.pad_token_id)
    new = gen[:, enc["input_ids"].shape[1]:]
    return [row.strip() for row in tok.batch_decode(new, skip_special_tokens=True)]


def _run(model, processor, texts, images, batches, max_new_tokens, desc, out: list, on_batch=None,
         before_batch=None) -> None:
    for batch in tqdm(batches, desc=desc, disable=not progress_enabled()):
        if before_batch is not None:
            before_batch(batch)
        imgs = [images[i] for i in batch] if images[batch[0]] is not None else None
        answers = _generate_batch(model, processor, [texts[i] for i in batch], imgs, max_new_tokens)
        for i, a in zip(batch, answers):
            out[i] = a
        if on_batch is not None:
            on_batch(batch, answers)


def generate(model, processor, texts: Sequence[str], images: Sequence | None = None, *, max_new_tokens: int = 48,
             batch_size: int = 16, desc: str = "generate", before_batch=None) -> list[str]:
    """Greedy continuations of fully formatted inputs (chat template applied), in input order.

    `images[i]` is a PIL image for inputs that hold the image placeholder, else None; items with and without
    images are batched separately because a batch's pixel_values must match its placeholders.
    `before_batch(indices)` is called with each batch's input indices before it is decoded (per-input steering)."""
    images = list(images) if images is not None else [None] * len(texts)
    out: list[str | None] = [None] * len(texts)
    _run(model, processor, texts, images, _plan(texts, images, batch_size), max_new_tokens, desc, out,
         before_batch=before_batch)
    return out  # type: ignore[return-value]


def generate_per_sample(model, processor, texts: Sequence[str], images: Sequence | None = None, *,
                        max_new_tokens: int = 48, desc: str = "generate (per sample)") -> list[str]:
    """The loop peers' scripts run: one prompt at a time, no padding, the same greedy settings.

    Kept as the reference that batched `generate` is compared against (benchmarks/bench_generate.py):
    same outputs, several times slower."""
    images = list(images) if images is not None else [None] * len(texts)
    out: list[str | None] = [None] * len(texts)
    _run(model, processor, texts, images, [[i] for i in range(len(texts))], max_new_tokens, desc, out)
    return out  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# resumable generation


def _input_hash(text: str, image) -> str:
    """SHA-256 of what the model sees (text + image pixels), stored per row so a resumed run never
    reuses an answer that was generated for a different input under the same key."""
    h = hashlib.sha256(text.encode("utf-8"))
    if image is not None:
        h.update(f"|{image.mode}|{image.size}|".encode())
        h.update(image.tobytes())
    return h.hexdigest()


@torch.no_grad()
def weights_fingerprint(model) -> str:
    """A short identity of a model's current weights (adapters included): SHA-256 over every parameter's name,
    shape, dtype and exact bytes, so it is the same on any machine, thread count or device (a float sum is not).
    Used to keep resumable answers apart per model: an old adapter's or organism's answers are never served
    for new weights. Measured 0.6 s for the organism (~0.5 GB) on 2 cores; a 7B model in bf16, estimated ~15-20 s."""
    h = hashlib.sha256()
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    for name, t in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        flat = t.detach().reshape(-1)
        bits = flat.contiguous().view(as_int[flat.element_size()])  # numpy has no bf16: hash the raw bits
        for start in range(0, bits.numel(), 1 << 24):  # chunks: no full host copy of a large GPU tensor
            h.update(bits[start:start + (1 << 24)].cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _read_done(path: Path) -> dict:
    """Rows already in `path`, by key. A torn last line (a write cut short by an interruption) is
    dropped with a warning and cut from the file, so appending continues from a clean line end; a bad
    line anywhere else means the file was edited or is not ours, and stops the run."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    lines = data.split(b"\n")
    done, good_end, pos = {}, 0, 0
    for n, line in enumerate(lines):
        end = pos + len(line) + 1
        if line.strip():
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or "key" not in row or "answer" not in row:
                    raise ValueError("not a generation row")
            except ValueError as e:
                if n == len(lines) - 1:  # last line, no newline after it: a partial write
                    warnings.warn(f"{path}: dropped an incomplete last line ({len(line)} bytes, {e}); "
                                  "that item is generated again.", stacklevel=3)
                    break
                raise TuError(f"{path} line {n + 1} is not a generation row ({e}); it is not a partial write "
                              "(lines follow it), so the file was edited or written by something else. "
                              "Fix or delete it.") from e
            if row["key"] in done:
                raise TuError(f"{path} holds key {row['key']!r} twice; the file was not written by generate_jsonl.")
            done[row["key"]] = row
        good_end = min(end, len(data))
        pos = end
    if good_end < len(data):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    if good_end and not data[:good_end].endswith(b"\n"):  # a complete last row that lost its newline
        with open(path, "ab") as f:
            f.write(b"\n")
    return done


def _check_items(items: Sequence[dict]) -> None:
    keys = set()
    for n, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("text"), str):
            raise TuError(f"items[{n}] must be a dict with a str 'text' (and 'key', optional 'image').")
        key = item.get("key")
        if not isinstance(key, (str, int)) or isinstance(key, bool):
            raise TuError(f"items[{n}] needs a 'key' (str or int) that names it across runs, got {key!r}.")
        if key in keys:
            raise TuError(f"Duplicate key {key!r} in items; keys must be unique, resuming matches rows by key.")
        keys.add(key)


def generate_jsonl(model, processor, items: Sequence[dict], path: str | os.PathLike, *, max_new_tokens: int = 48,
                   batch_size: int = 16, desc: str = "generate", model_id: str | None = None) -> list[str]:
    """`generate`, resumable: answers are appended to the JSONL file at `path`, one row per item
    ({"key", "answer", "input_sha256", "max_new_tokens", "model_id"}), flushed to disk after every batch.

    `items` are dicts with a unique "key", the formatted input "text" and an optional PIL "image".
    Items whose key is already in the file are not generated again, so an interrupted run loses at
    most the batch in flight; a row whose input hash, max_new_tokens or model_id (e.g.
    `weights_fingerprint(model)`) differs from this run is an error (stale answers must not be mixed
    with new ones: use a new path). Rows for keys not in `items` are left alone. Returns the answers
    in item order."""
    _check_items(items)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = _read_done(path)
    texts = [it["text"] for it in items]
    images = [it.get("image") for it in items]
    hashes = [_input_hash(t, im) for t, im in zip(texts, images)]
    out: list[str | None] = [None] * len(items)
    for i, item in enumerate(items):
        row = done.get(item["key"])
        if row is None:
            continue
        if row.get("input_sha256") != hashes[i] or row.get("max_new_tokens") != max_new_tokens:
            raise TuError(f"{path} already holds key {item['key']!r} for a different input or max_new_tokens; "
                          "its answer would not match this run. Use a new path (or delete the file) to regenerate.")
        if row.get("model_id") != model_id:
            raise TuError(f"{path} already holds key {item['key']!r} from other model weights ({row.get('model_id')!r}, "
                          f"this run {model_id!r}); its answer would not match this run. Use a new path (or delete the "
                          "file) to regenerate.")
        out[i] = row["answer"]
    todo = [i for i in range(len(items)) if out[i] is None]
    if not todo:
        return out  # type: ignore[return-value]

    with open(path, "a", encoding="utf-8") as f:
        def append(batch, answers):
            f.write("".join(json.dumps({"key": items[i]["key"], "answer": a, "input_sha256": hashes[i],
                                        "max_new_tokens": max_new_tokens, "model_id": model_id}, ensure_ascii=False) + "\n"
                            for i, a in zip(batch, answers)))
            f.flush()
            os.fsync(f.fileno())

        sub_t, sub_i = [texts[i] for i in todo], [images[i] for i in todo]
        sub_out: list[str | None] = [None] * len(todo)
        _run(model, processor, sub_t, sub_i, _plan(sub_t, sub_i, batch_size), max_new_tokens, desc, sub_out,
             on_batch=lambda batch, answers: append([todo[j] for j in batch], answers))
    for j, i in enumerate(todo):
        out[i] = sub_out[j]
    return out  # type: ignore[return-value]
