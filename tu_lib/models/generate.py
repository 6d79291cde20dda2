"""Batched greedy generation for any preset (the LLaVA code path serves them all).

Peers' scripts generate one prompt at a time through `model.generate`; `generate` runs the same greedy
decode with identical float32 outputs on the benchmark inputs, several times faster on a CPU
(benchmarks/bench_generate.py measures it against `generate_reference`, the HF left-padded batches this
module used before, and against the GEMM rate of the machine). The fast path is a greedy loop over the
model's own forward with HF's DynamicCache (`_run_greedy`), because `model.generate` spends its time where
nothing is needed on a CPU:
- every prompt of a call starts with the same chat-template prefix (ChatML's system turn is 24 of a text
  prompt's ~45 tokens): its KV cache is computed once per call and copied into every batch (`_Prefix`);
- a batch decodes until its longest answer ends, on fewer and fewer rows: here rows leave the batch (and
  its cache) as they finish and waiting prompts join it (continuous batching), so decode steps stay
  matrix-matrix work;
- HF's DynamicCache copies every layer's whole cache on every decode step (`torch.cat`): the caches here append
  in place (`kv_cache.GrowingLayer`), the same keys and values without the copy.
`generate_jsonl` is the resumable form for long runs: outputs are appended to a JSONL file as rows
finish, so an interrupted evaluation restarts where it stopped instead of from zero."""
from __future__ import annotations

import copy
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Sequence

import torch
from tqdm.std import tqdm  # plain bars: tqdm.auto warns about ipywidgets on stderr in notebooks
from ..core.errors import TuError

if TYPE_CHECKING:  # transformers is imported where it is used: `progress_enabled` users stay light
    from transformers import DynamicCache

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
def _generate_batch_hf(model, processor, texts: list[str], images: list | None, max_new_tokens: int) -> list[str]:
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
    from transformers.generation.logits_process import SuppressTokensLogitsProcessor

    config = copy.deepcopy(model.generation_config)
    config.update(do_sample=False, num_beams=1)
    with warnings.catch_warnings():  # a probe: warnings about processors it rejects are model.generate's to give
        warnings.simplefilter("ignore")
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
    from .kv_cache import new_cache

    ids = _common_prefix(model, processor, texts)
    if not ids:
        return None
    cache = new_cache(model.config)
    model(input_ids=torch.tensor([ids], device=model.device), past_key_values=cache, use_cache=True, logits_to_keep=1)
    return _Prefix(ids, cache)


class _Rows(NamedTuple):
    """Rows being decoded: their input indices, KV cache, attention mask over the cache, position of their
    last token and the token to feed next. Layout of a row: [shared prefix | padding | own tokens | answer]."""
    idx: list[int]
    cache: DynamicCache
    mask: torch.Tensor
    pos: torch.Tensor
    token: torch.Tensor

    def take(self, keep: torch.Tensor) -> "_Rows":
        self.cache.batch_select_indices(keep)
        return _Rows([self.idx[k] for k in keep.tolist()], self.cache, self.mask[keep], self.pos[keep], self.token[keep])

    def join(self, other: "_Rows") -> "_Rows":
        """Both sets of rows in one batch: the shorter cache is left-padded with masked columns, so each row
        still attends to exactly its own positions (positions are explicit, not column numbers)."""
        from .kv_cache import join_left_padded

        width = max(self.mask.shape[1], other.mask.shape[1])

        def pad(t):  # left-pad the mask's columns to `width` with zeros
            return torch.nn.functional.pad(t, (width - t.shape[1], 0))

        join_left_padded(self.cache, other.cache, width)
        return _Rows(self.idx + other.idx, self.cache, torch.cat([pad(self.mask), pad(other.mask)]),
                     torch.cat([self.pos, other.pos]), torch.cat([self.token, other.token]))


@torch.inference_mode()
def _prefill(model, processor, texts: list[str], images: list | None, idx: list[int],
             prefix: _Prefix | None, keys: list[str] | None = None, lower=None) -> tuple[_Rows, torch.Tensor]:
    """The prompts' forward pass, after the shared prefix (its cache copied, not recomputed): the new rows
    and their last position's logits (the only ones computed). With `lower` (a lower_layers.SharedLowerLayers usable
    with this model) and the inputs' `keys`, the shared lower layers' states are replayed when all are stored, else
    recorded."""
    from .kv_cache import new_cache

    device = model.device
    enc = _encode(processor, texts, images)
    n_prefix = len(prefix.ids) if prefix is not None else 0
    rows = [ids[m.bool()].tolist() for ids, m in zip(enc["input_ids"], enc["attention_mask"])]
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
    if prefix is not None:
        cache = copy.deepcopy(prefix.cache)
        cache.batch_repeat_interleave(B)
    else:
        cache = new_cache(model.config)
    pixel_values = enc["pixel_values"].to(device, model.dtype) if "pixel_values" in enc else None
    inputs = dict(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                  logits_to_keep=1)
    if lower is None:
        out = model(**inputs, pixel_values=pixel_values)
    elif lower.has(keys):  # layers 0..k-1 and the vision tower replayed from the states stored for these inputs
        with lower.replaying(model, keys, W):
            out = model(**inputs, pixel_values=None)
    else:
        with lower.recording(model, keys, cache, [len(o) for o in own]):
            out = model(**inputs, pixel_values=pixel_values)
    return _Rows(idx, cache, mask, pos[:, -1], ids[:, -1]), out.logits[:, -1, :]


@torch.inference_mode()
def _step(model, rows: _Rows) -> tuple[_Rows, torch.Tensor]:
    """One decode forward pass of every row (its `token` fed at the next position)."""
    mask = torch.cat([rows.mask, rows.mask.new_ones((rows.mask.shape[0], 1))], dim=1)
    pos = rows.pos + 1
    out = model(input_ids=rows.token[:, None], attention_mask=mask, position_ids=pos[:, None],
                past_key_values=rows.cache, use_cache=True, logits_to_keep=1)
    return rows._replace(mask=mask, pos=pos), out.logits[:, -1, :]


# A prompt joins a prefill group only if it is at most this many times as long (in characters) as the group's first,
# shortest one: a group is left-padded to its longest prompt, and stage 03's sets range from 37-token requests to
# 439-token jailbreak templates. Without the bound, 48 rows took 1.8x longer than 16 on stage 03's 94 validation items
# (one 48-row prefill padded to 439 tokens took 45 of 73 s); with it, 48 rows take 0.73x as long as 16 there and 0.89x
# on its 329 test items, with the same float32 greedy answers (2026-12-07; README, issue 20).
MAX_LENGTH_RATIO = 1.5


def _admit(queue: list[int], texts: Sequence[str], images: Sequence, free: int) -> list[int]:
    """The next prompts to prefill: up to `free` from the head of the queue (sorted by length within a modality),
    one modality (a forward pass's pixel_values must match its placeholders), none longer than MAX_LENGTH_RATIO
    times the first."""
    text = images[queue[0]] is None
    limit = MAX_LENGTH_RATIO * len(texts[queue[0]])
    group = []
    while queue and len(group) < free and (images[queue[0]] is None) == text and len(texts[queue[0]]) <= limit:
        group.append(queue.pop(0))
    return group


@torch.inference_mode()
def _run_greedy(model, processor, texts, images, batch_size: int, max_new_tokens: int, desc: str, out: list,
                on_batch=None, before_batch=None, prefix: _Prefix | None = None, keys=None, lower=None) -> None:
    """Greedy answers of all inputs with up to `batch_size` rows decoded together (continuous batching).

    A greedy loop over the model's forward with HF's DynamicCache, `model.generate`'s greedy decode without
    its waste: logits only for the last position; a row leaves the batch, its cache rows included, when it
    emits EOS or reaches max_new_tokens, and prompts waiting in `_plan`'s order (by modality and length)
    are prefilled and joined to the batch once half of it is free, so decode steps keep running on a full
    batch (matrix-matrix work) instead of on the few rows a static batch has left. Text and image rows
    share decode steps (only the prompt's forward pass reads pixel_values). `before_batch(indices)` is
    called with the input indices of the rows of every forward pass (per-input steering); `on_batch`
    with the indices and answers of the rows that finished in a step. Falls back to `model.generate`
    over `_plan`'s batches when the generation config needs a processor the loop does not run."""
    setup = _greedy_setup(model)
    if setup is None:
        _run(model, processor, texts, images, _plan(texts, images, batch_size), max_new_tokens, desc, out,
             on_batch=on_batch, before_batch=before_batch)
        return
    processors, eos = setup
    queue = [i for batch in _plan(texts, images, batch_size) for i in batch]
    answers: dict[int, list[int]] = {i: [] for i in queue}
    rows: _Rows | None = None
    with tqdm(total=len(queue), desc=desc, disable=not progress_enabled()) as bar:
        while queue or rows is not None:
            n = 0 if rows is None else len(rows.idx)
            if queue and (n == 0 or batch_size - n >= max(1, batch_size // 2)):
                group = _admit(queue, texts, images, batch_size - n)
                if before_batch is not None:
                    before_batch(group)
                imgs = [images[i] for i in group] if images[group[0]] is not None else None
                new, logits = _prefill(model, processor, [texts[i] for i in group], imgs, group, prefix,
                                       keys=[keys[i] for i in group] if lower is not None else None, lower=lower)
            else:
                if before_batch is not None:
                    before_batch(rows.idx)
                new, logits = _step(model, rows)
                rows = None
            token = processors(None, logits).argmax(-1)
            done = torch.isin(token, eos)
            for k, (i, t) in enumerate(zip(new.idx, token.tolist())):
                answers[i].append(t)
                done[k] |= len(answers[i]) >= max_new_tokens
            finished = [i for i, d in zip(new.idx, done.tolist()) if d]
            if finished:
                texts_done = _decode(processor.tokenizer, [answers.pop(i) for i in finished])
                for i, a in zip(finished, texts_done):
                    out[i] = a
                if on_batch is not None:
                    on_batch(finished, texts_done)
                bar.update(len(finished))
            if not done.all():
                new = new._replace(token=token)
                new = new.take((~done).nonzero().squeeze(1)) if done.any() else new
                rows = new if rows is None else rows.join(new)


def _run(model, processor, texts, images, batches, max_new_tokens, desc, out: list, on_batch=None,
         before_batch=None) -> None:
    """`model.generate` over the given batches (the reference paths, and the fallback of `_run_greedy`)."""
    for batch in tqdm(batches, desc=desc, disable=not progress_enabled()):
        if before_batch is not None:
            before_batch(batch)
        imgs = [images[i] for i in batch] if images[batch[0]] is not None else None
        answers = _generate_batch_hf(model, processor, [texts[i] for i in batch], imgs, max_new_tokens)
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

    `images[i]` is a PIL image for inputs that hold the image placeholder, else None. At most `batch_size`
    rows are decoded together (`_run_greedy`). `before_batch(indices)` is called with the input indices of
    the rows of every forward pass, prompt and decode steps alike (per-input steering); with it, the
    shared prompt prefix is not reused, since a per-input hook may change the prefix's states per input."""
    _check_max_new_tokens(max_new_tokens)
    if not texts:
        return []
    images = list(images) if images is not None else [None] * len(texts)
    out: list[str | None] = [None] * len(texts)
    prefix = _make_prefix(model, processor, texts) if before_batch is None else None
    _run_greedy(model, processor, texts, images, batch_size, max_new_tokens, desc, out, before_batch=before_batch,
                prefix=prefix)
    return out  # type: ignore[return-value]


def generate_reference(model, processor, texts: Sequence[str], images: Sequence | None = None, *,
                       max_new_tokens: int = 48, batch_size: int = 16, desc: str = "generate (reference)") -> list[str]:
    """The decode `generate` ran before the greedy loop: `model.generate` over the same left-padded batches.
    Kept as the reference the fast path is measured and checked against (benchmarks/bench_generate.py)."""
    images = list(images) if images is not None else [None] * len(texts)
    out: list[str | None] = [None] * len(texts)
    _run(model, processor, texts, images, _plan(texts, images, batch_size), max_new_tokens, desc, out)
    return out  # type: ignore[return-value]


def generate_per_sample(model, processor, texts: Sequence[str], images: Sequence | None = None, *,
                        max_new_tokens: int = 48, desc: str = "generate (per sample)") -> list[str]:
    """The loop peers' scripts run: one prompt at a time through `model.generate`, no padding, the same
    greedy settings. Kept as the reference that batched `generate` is compared against (the tests)."""
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
                   batch_size: int = 16, desc: str = "generate", model_id: str | None = None, lower=None) -> list[str]:
    """`generate`, resumable: answers are appended to the JSONL file at `path`, one row per item
    ({"key", "answer", "input_sha256", "max_new_tokens", "model_id"}), flushed to disk as rows finish.

    `items` are dicts with a unique "key", the formatted input "text" and an optional PIL "image".
    Items whose key is already in the file are not generated again, so an interrupted run loses at
    most the rows in flight (at most `batch_size`); a row whose input hash, max_new_tokens or model_id (e.g.
    `weights_fingerprint(model)`) differs from this run is an error (stale answers must not be mixed
    with new ones: use a new path). Rows for keys not in `items` are left alone. Returns the answers
    in item order. `lower`: a lower_layers.SharedLowerLayers shared by calls of several models on the same inputs;
    used only when this model's shared layers are those it recorded from (and carry no forward hooks)."""
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
        if lower is not None and not lower.usable_with(model):
            lower = None  # this model's shared layers differ from the stored states' model: prefill them itself
        _run_greedy(model, processor, sub_t, sub_i, batch_size, max_new_tokens, desc, sub_out,
                    on_batch=lambda batch, answers: append([todo[j] for j in batch], answers),
                    prefix=_make_prefix(model, processor, sub_t), keys=[hashes[i] for i in todo], lower=lower)
    for j, i in enumerate(todo):
        out[i] = sub_out[j]
    return out  # type: ignore[return-value]
