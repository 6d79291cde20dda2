"""Batched greedy generation for any preset (the LLaVA code path serves them all).

Peers' scripts generate one prompt at a time through `model.generate`; `generate` runs the same greedy
decode with identical float32 outputs on the benchmark inputs, several times faster on a CPU
(benchmarks/bench_generate.py measures it against `generate_reference`, the HF left-padded batches this
module used before, and against the GEMM rate of the machine). The fast path is a greedy loop over the
model's own forward with HF's DynamicCache (`_greedy`), because `model.generate` spends its time where
nothing is needed on a CPU:
- every prompt of a call starts with the same chat-template prefix (ChatML's system turn is 24 of a text
  prompt's ~45 tokens): its KV cache is computed once per call and copied into every batch (`_Prefix`);
- a batch decodes until its longest answer ends: rows leave the batch (and its cache) as they finish.
`generate_jsonl` is the resumable form for long runs: outputs are appended to a JSONL file after every
batch, so an interrupted evaluation restarts where it stopped instead of from zero."""
from __future__ import annotations

import copy
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import torch
from tqdm.std import tqdm  # plain bars: tqdm.auto warns about ipywidgets on stderr in notebooks
from transformers import DynamicCache
from transformers.generation.logits_process import SuppressTokensLogitsProcessor

from ..core.errors import TuError

__all__ = ["generate", "generate_per_sample", "generate_reference", "generate_jsonl", "progress_enabled",
           "weights_fingerprint"]


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


def _encode(processor, texts: list[str], images: list | None) -> dict:
    """Left-padded model inputs of one batch (image placeholders expanded by the processor)."""
    tok = processor.tokenizer
    tok.padding_side = "left"
    if images is not None:
        return dict(processor(text=texts, images=images, return_tensors="pt", padding=True))
    return dict(tok(texts, return_tensors="pt", padding=True, add_special_tokens=False))


def _decode(tok, rows) -> list[str]:
    return [row.strip() for row in tok.batch_decode(rows, skip_special_tokens=True)]


@torch.inference_mode()
def _generate_batch_hf(model, processor, texts: list[str], images: list | None, max_new_tokens: int,
                       prefix=None, select=None) -> list[str]:
    """One left-padded greedy batch through `model.generate` (`images` is None for a text-only batch):
    the reference decode that `generate_per_sample` and `generate_reference` run."""
    enc = {k: v.to(model.device) for k, v in _encode(processor, texts, images).items()}
    if "pixel_values" in enc:
        enc["pixel_values"] = enc["pixel_values"].to(model.dtype)
    gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                         pad_token_id=processor.tokenizer.pad_token_id)
    return _decode(processor.tokenizer, gen[:, enc["input_ids"].shape[1]:])


class _Prefix(NamedTuple):
    """The token ids every input of a call starts with, and their KV cache (batch of one)."""
    ids: list[int]
    cache: DynamicCache


def _greedy_setup(model):
    """(logits processors, EOS ids) of greedy `model.generate` with this model's generation config, or None
    when that config asks for a processor `_greedy` does not run (it then falls back to `model.generate`).
    Only token suppression is supported: it does not read the sequence so far, which `_greedy` does not keep
    per row in `model.generate`'s layout (the organism's config suppresses the image token)."""
    config = copy.deepcopy(model.generation_config)
    config.update(do_sample=False, num_beams=1)
    processors = model._get_logits_processor(generation_config=config, device=model.device)
    if any(not isinstance(p, SuppressTokensLogitsProcessor) for p in processors):
        return None
    eos = config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return processors, torch.tensor(eos, device=model.device)


def _common_prefix(model, processor, texts: Sequence[str]) -> list[int]:
    """The longest token prefix all `texts` share, cut before the first image placeholder (image features
    differ per input) and so that every input keeps at least one token of its own (its last position's
    logits pick the first answer token)."""
    rows = processor.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    image_id = getattr(model.config, "image_token_id", None)
    n = min(len(r) for r in rows) - 1
    for k in range(max(n, 0)):
        t = rows[0][k]
        if t == image_id or any(r[k] != t for r in rows):
            return rows[0][:k]
    return rows[0][:max(n, 0)]


@torch.inference_mode()
def _make_prefix(model, processor, texts: Sequence[str]) -> _Prefix | None:
    ids = _common_prefix(model, processor, texts)
    if not ids:
        return None
    cache = DynamicCache(config=model.config)
    model(input_ids=torch.tensor([ids], device=model.device), past_key_values=cache, use_cache=True, logits_to_keep=1)
    return _Prefix(ids, cache)


@torch.inference_mode()
def _generate_batch(model, processor, texts: list[str], images: list | None, max_new_tokens: int,
                    prefix: _Prefix | None = None, select: Callable[[list[int]], None] | None = None) -> list[str]:
    """One greedy batch through `_greedy`, or `model.generate` when the generation config needs it."""
    setup = _greedy_setup(model)
    if setup is None:
        if select is not None:
            select(list(range(len(texts))))
        return _generate_batch_hf(model, processor, texts, images, max_new_tokens)
    enc = _encode(processor, texts, images)
    rows = [ids[m.bool()].tolist() for ids, m in zip(enc["input_ids"], enc["attention_mask"])]
    pixel_values = enc["pixel_values"].to(model.device, model.dtype) if "pixel_values" in enc else None
    answers = _greedy(model, rows, pixel_values, max_new_tokens, *setup, prefix=prefix, select=select)
    return _decode(processor.tokenizer, answers)


@torch.inference_mode()
def _greedy(model, rows: list[list[int]], pixel_values, max_new_tokens: int, processors, eos: torch.Tensor,
            prefix: _Prefix | None = None, select: Callable[[list[int]], None] | None = None) -> list[list[int]]:
    """Greedy answers (token ids, EOS included) of one batch, `model.generate`'s decode over the model's forward.

    Layout: [shared prefix | left padding | the row's own tokens]. The prefix's KV cache is copied into the
    batch rather than recomputed; explicit position ids skip the padding, so every row sees exactly its
    unpadded sequence (the attention mask hides the padding, as in a left-padded batch). Logits are computed
    for the last position only. A row leaves the batch, its cache rows included, when it emits EOS, so
    later steps cost what the unfinished rows need. `select(rows)` is called with the batch-local indices of
    the rows about to be decoded before every forward pass that changes them (per-input steering hooks)."""
    device = model.device
    n_prefix = len(prefix.ids) if prefix is not None else 0
    own = [r[n_prefix:] for r in rows]
    if prefix is not None and any(r[:n_prefix] != prefix.ids or not o for r, o in zip(rows, own)):
        raise TuError("Internal: an input does not start with the shared prefix its call computed.")
    B, W = len(rows), max(len(o) for o in own)
    ids = torch.zeros((B, W), dtype=torch.long)
    mask = torch.zeros((B, n_prefix + W), dtype=torch.long)
    mask[:, :n_prefix] = 1
    pos = torch.zeros((B, W), dtype=torch.long)
    for b, o in enumerate(own):
        ids[b, W - len(o):] = torch.tensor(o)
        mask[b, n_prefix + W - len(o):] = 1
        pos[b, W - len(o):] = torch.arange(n_prefix, n_prefix + len(o))
    ids, mask, pos = ids.to(device), mask.to(device), pos.to(device)
    cache = DynamicCache(config=model.config)
    if prefix is not None:
        cache = copy.deepcopy(prefix.cache)
        cache.batch_repeat_interleave(B)
    if select is not None:
        select(list(range(B)))
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, pixel_values=pixel_values,
                past_key_values=cache, use_cache=True, logits_to_keep=1)
    active = torch.arange(B, device=device)
    last_pos = pos[:, -1]
    answers: list[list[int]] = [[] for _ in range(B)]
    for step in range(max_new_tokens):
        token = processors(None, out.logits[:, -1, :]).argmax(-1)
        for b, t in zip(active.tolist(), token.tolist()):
            answers[b].append(t)
        if step == max_new_tokens - 1:
            break
        going = ~torch.isin(token, eos)
        if not going.all():
            if not going.any():
                break
            keep = going.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            active, token, mask, last_pos = active[keep], token[keep], mask[keep], last_pos[keep]
            if select is not None:
                select(active.tolist())
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        last_pos = last_pos + 1
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=last_pos[:, None],
                    past_key_values=cache, use_cache=True, logits_to_keep=1)
    return answers


def _run(model, processor, texts, images, batches, max_new_tokens, desc, out: list, on_batch=None,
         before_batch=None, decode=_generate_batch, prefix: _Prefix | None = None) -> None:
    for batch in tqdm(batches, desc=desc, disable=not progress_enabled()):
        select = None
        if before_batch is not None:
            def select(local, batch=batch):
                before_batch([batch[j] for j in local])
        imgs = [images[i] for i in batch] if images[batch[0]] is not None else None
        answers = decode(model, processor, [texts[i] for i in batch], imgs, max_new_tokens, prefix=prefix, select=select)
        for i, a in zip(batch, answers):
            out[i] = a
        if on_batch is not None:
            on_batch(batch, answers)


def _check_max_new_tokens(max_new_tokens) -> None:
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise TuError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}.")


def generate(model, processor, texts: Sequence[str], images: Sequence | None = None, *, max_new_tokens: int = 48,
             batch_size: int = 16, desc: str = "generate", before_batch=None) -> list[str]:
    """Greedy continuations of fully formatted inputs (chat template applied), in input order.

    `images[i]` is a PIL image for inputs that hold the image placeholder, else None; items with and without
    images are batched separately because a batch's pixel_values must match its placeholders.
    `before_batch(indices)` is called with the input indices of the rows about to be decoded before each
    batch's first forward pass, and again whenever finished rows have left the batch (per-input steering).
    With `before_batch` the shared prompt prefix is not reused: a per-input hook may change it per input."""
    _check_max_new_tokens(max_new_tokens)
    images = list(images) if images is not None else [None] * len(texts)
    out: list[str | None] = [None] * len(texts)
    if not texts:
        return []
    prefix = _make_prefix(model, processor, texts) if before_batch is None else None
    _run(model, processor, texts, images, _plan(texts, images, batch_size), max_new_tokens, desc, out,
         before_batch=before_batch, prefix=prefix)
    return out  # type: ignore[return-value]


def generate_reference(model, processor, texts: Sequence[str], images: Sequence | None = None, *,
                       max_new_tokens: int = 48, batch_size: int = 16, desc: str = "generate (reference)") -> list[str]:
    """The decode `generate` ran before the greedy loop: `model.generate` over the same left-padded batches.
    Kept as the reference the fast path is measured and checked against (benchmarks/bench_generate.py)."""
    images = list(images) if images is not None else [None] * len(texts)
    out: list[str | None] = [None] * len(texts)
    _run(model, processor, texts, images, _plan(texts, images, batch_size), max_new_tokens, desc, out,
         decode=_generate_batch_hf)
    return out  # type: ignore[return-value]


def generate_per_sample(model, processor, texts: Sequence[str], images: Sequence | None = None, *,
                        max_new_tokens: int = 48, desc: str = "generate (per sample)") -> list[str]:
    """The loop peers' scripts run: one prompt at a time through `model.generate`, no padding, the same
    greedy settings. Kept as the reference that batched `generate` is compared against (the tests)."""
    images = list(images) if images is not None else [None] * len(texts)
    out: list[str | None] = [None] * len(texts)
    _run(model, processor, texts, images, [[i] for i in range(len(texts))], max_new_tokens, desc, out,
         decode=_generate_batch_hf)
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
             on_batch=lambda batch, answers: append([todo[j] for j in batch], answers),
             prefix=_make_prefix(model, processor, sub_t))
    for j, i in enumerate(todo):
        out[i] = sub_out[j]
    return out  # type: ignore[return-value]
