"""One method's resumable training run.

The loop checkpoints adapter, optimizer, scheduler and RNG every `checkpoint_every` steps; a rerun with
the same arguments resumes and ends bit-identical to an uninterrupted run. The batch of every step is a
deterministic function of the seed, so resuming needs no data-loader state. Yao et al.'s stop rule ends
ascent methods when the forget NLL passes `max_forget_nll`. With `accelerate launch --num_processes N`,
each process takes a slice of every step's rows and gradients are averaged across processes.

For training curves, a run with `curve_points` keeps the adapter of geometrically spaced steps (curve_steps) under
curve/step-NNNN/, hashed in summary.json like the final adapter; curve_checkpoints lists them, base model first.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..core.errors import ParameterError, TuError
from ..core.files import atomic_dir, damaged_files, file_hashes, write_csv, write_json
from ..models.adapters import save_adapter
from ..models.generate import weights_fingerprint
from ..training.loop import Optimiser, linear_decay, run_steps
from .base import ImageCache, step_loss, step_rows
from .config import TrainConfig
from .data import UnlearnData
from .registry import METHODS


def schedule(cfg: TrainConfig, data: UnlearnData) -> list[dict]:
    """Row indices of every step: forget rows walk through shuffled epochs; each forget row gets a random
    mismatch answer; normal rows walk through their own shuffled epochs. A pure function of the seed."""
    rng = np.random.default_rng(cfg.seed)

    def stream(n):
        while True:
            yield from rng.permutation(n).tolist()

    f_stream, n_stream = stream(len(data.forget)), stream(len(data.normal))
    out = []
    for _ in range(cfg.steps):
        forget = [next(f_stream) for _ in range(cfg.batch_size)]
        normal = [next(n_stream) for _ in range(cfg.batch_size)]
        mismatch = rng.integers(len(data.mismatch_answers), size=cfg.batch_size).tolist()
        out.append({"forget": forget, "normal": normal, "mismatch": mismatch})
    return out


def curve_steps(steps: int, points: int) -> list[int]:
    """The steps whose weights a run keeps for its training curve: at least `points` of them (every step when that
    is more than the run has), geometrically spaced from step 1 to the last step, rounded and deduplicated. Unlearning
    moves fastest early, so the early steps are seen closely, and a longer run costs only a few more points. Step 0,
    the base model, is not saved."""
    if points <= 0:
        return []
    if points == 1:  # the last step alone (a one-point grid would be step 1)
        return [steps]
    if points >= steps:
        return list(range(1, steps + 1))
    k = points
    while True:  # rounding merges early points: widen the grid until enough distinct steps remain
        picked = sorted({int(round(x)) for x in np.geomspace(1, steps, k)})
        if len(picked) >= points:
            return picked
        k += 1


CURVE_DIR = "curve"  # under a method's folder: one step-NNNN/ folder per kept step before the last


def curve_point_dir(method_dir, step: int) -> Path:
    return Path(method_dir) / CURVE_DIR / f"step-{step:04d}"


def shard(rows: dict[str, list], index: int, count: int) -> dict[str, list]:
    """This process's slice of every role (multi-process training with accelerate)."""
    return {k: v[index::count] for k, v in rows.items()}


# ---------------------------------------------------------------------------------------------
# the training loop


def wrap_model(vlm, cfg: TrainConfig):
    """LoRA on the LLM's decoder linears (peft), or full fine-tuning of the LLM; returns (model, trainable
    parameters, reference context manager factory)."""
    import copy

    base = vlm.base_model
    n_layers = len(vlm.decoder_layers())
    if cfg.lora_first_layer >= n_layers:
        raise ParameterError(f"lora_first_layer={cfg.lora_first_layer} but the {vlm.preset} LLM has {n_layers} layers.")
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        layers = None if cfg.lora_first_layer == 0 else list(range(cfg.lora_first_layer, n_layers))
        target = vlm.language_model_module_regex(list(cfg.lora_targets), layers)
        lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=target, bias="none")
        model = get_peft_model(base, lcfg)
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise TuError(f"No LoRA target matched {list(cfg.lora_targets)} in the {vlm.preset} LLM.")
        return model, trainable, model.disable_adapter
    frozen = copy.deepcopy(base).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    for p in base.parameters():
        p.requires_grad_(False)
    lm = base.model.language_model
    for p in list(lm.parameters()) + list(base.lm_head.parameters()):
        p.requires_grad_(True)
    model = _FullFT(base, frozen)  # answer_logits sees the frozen copy inside model.reference()
    return model, [p for p in base.parameters() if p.requires_grad], model.reference


class _FullFT(torch.nn.Module):
    """Full fine-tuning wrapper: behaves as the trained model, or as the frozen copy inside `reference()`."""

    def __init__(self, trained, frozen):
        super().__init__()
        self.trained, self.frozen, self._use_frozen = trained, frozen, False

    def get_base_model(self):
        return self.frozen if self._use_frozen else self.trained

    def reference(self):
        import contextlib

        @contextlib.contextmanager
        def ctx():
            self._use_frozen = True
            try:
                yield
            finally:
                self._use_frozen = False
        return ctx()


def _trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(path: Path, model, opt, sched, step: int, log: list[dict], key: str, stopped: str | None) -> None:
    """Adapter (or LLM) weights, optimizer, scheduler, RNG and the loss log, written atomically."""
    from safetensors.torch import save_file

    with atomic_dir(path) as tmp:
        save_file(_trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step,
                    "torch_rng": torch.get_rng_state(), "key": key, "stopped": stopped,
                    "log": json.dumps(log)}, tmp / "state.pt")


def load_checkpoint(path: Path, model, opt, sched, key: str):
    """(step, log, stopped) from a checkpoint of the same run, or None when there is none to resume."""
    from safetensors.torch import load_file

    state_file = path / "state.pt"
    if not state_file.is_file():
        return None
    state = torch.load(state_file, weights_only=True)
    if state.get("key") != key:
        return None
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return state["step"], json.loads(state["log"]), state["stopped"]


def _accelerator(cfg: TrainConfig):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if accelerator.num_processes > cfg.batch_size:  # shard() would hand the extra processes empty steps
        raise ParameterError(f"{accelerator.num_processes} processes but batch_size {cfg.batch_size}: each process needs at "
                             f"least one row of every step; launch with --num_processes <= {cfg.batch_size} or raise batch_size.")
    return accelerator


def _mean_across_processes(accelerator):
    """The gradient reduction of a multi-process run (None for one process: nothing to reduce)."""
    if accelerator.num_processes == 1:
        return None

    def reduce(params):
        for p in params:
            p.grad = accelerator.reduce(p.grad if p.grad is not None else torch.zeros_like(p), reduction="mean")
    return reduce


def train(vlm, data: UnlearnData, cfg: TrainConfig, out_dir, *, on_step=None, desc: str | None = None) -> dict:
    """Train one method and save it under out_dir (adapter/, losses.csv, summary.json); resumes from
    out_dir/checkpoint when the same run was interrupted. Returns the summary. `on_step(step)` is called
    after every step (tests use it to interrupt a run)."""
    if cfg.method not in METHODS:
        raise ParameterError(f"Unknown unlearning method {cfg.method!r}; choose from {list(METHODS)}.")
    if cfg.steps <= 0 or cfg.lr <= 0 or cfg.batch_size <= 0:
        raise ParameterError(f"steps, lr and batch_size must be > 0 (got {cfg.steps}, {cfg.lr}, {cfg.batch_size}).")
    method, out_dir = METHODS[cfg.method], Path(out_dir)
    accelerator = _accelerator(cfg)
    key = cfg.key(data, f"{vlm.preset}@{weights_fingerprint(vlm.model)}")  # other weights or dtype: another run
    finished = finished_summary(out_dir, key)
    if finished is not None:
        return finished  # this exact run is complete and its files are intact

    torch.manual_seed(cfg.seed)
    model, params, reference = wrap_model(vlm, cfg)
    optimiser = Optimiser(params, cfg.lr, linear_decay(cfg.steps))
    plan, images = schedule(cfg, data), ImageCache(vlm)
    ckpt = out_dir / "checkpoint"
    resumed = load_checkpoint(ckpt, model, optimiser.opt, optimiser.sched, key)
    start, log, stopped = resumed if resumed else (0, [], None)
    if resumed is None and accelerator.is_main_process:
        shutil.rmtree(out_dir / CURVE_DIR, ignore_errors=True)  # another run's curve points must not join this one's
    keep = set(curve_steps(cfg.steps, cfg.curve_points)) - {cfg.steps}  # the last step's weights are the result
    clock = {"last": time.time()}
    reduce = _mean_across_processes(accelerator)

    def step(i: int) -> bool:
        nonlocal stopped
        rows = shard(step_rows(vlm, method, data, plan[i], images), accelerator.process_index, accelerator.num_processes)
        loss, logged = step_loss(model, reference, method, cfg, vlm, rows)
        optimiser.update(loss, backward=accelerator.backward, reduce=reduce)
        now = time.time()
        log.append({"step": i + 1, **{k: round(v, 6) for k, v in logged.items()}, "lr": optimiser.lr(),
                    "seconds": round(now - clock["last"], 3)})
        clock["last"] = now
        if method.ascends and logged["forget_nll"] > cfg.max_forget_nll:
            stopped = f"forget NLL {logged['forget_nll']:.1f} > max_forget_nll {cfg.max_forget_nll:g} at step {i + 1}"
        if accelerator.is_main_process and i + 1 in keep and not stopped:  # before the checkpoint: a resume redoes it
            _keep_curve_point(out_dir, model, cfg, i + 1)
        if accelerator.is_main_process and ((i + 1) % cfg.checkpoint_every == 0 or stopped):
            save_checkpoint(ckpt, model, optimiser.opt, optimiser.sched, i + 1, log, key, stopped)
        if on_step is not None:
            on_step(i + 1)
        return bool(stopped)

    model.train()
    try:
        _check_kept_curve_points(out_dir, keep, start)
        if not stopped:
            run_steps(step, cfg.steps, start=start, desc=desc or cfg.method)
        model.eval()
        summary = _summary(vlm, method, data, cfg, key, log, stopped, plan, images)
        if accelerator.is_main_process:
            _save_result(out_dir, model, cfg, log, summary)
            shutil.rmtree(ckpt, ignore_errors=True)
    finally:
        if cfg.lora:  # take the LoRA layers out again, whatever happened: the caller's model stays the base model
            vlm.model = model.unload()
    return summary


def _check_kept_curve_points(out_dir: Path, keep: set[int], start: int) -> None:
    """A resumed run's curve points from before the interruption must still be there (they are not trained again)."""
    gone = [s for s in sorted(keep) if s <= start and not curve_point_dir(out_dir, s).is_dir()]
    if gone:
        raise TuError(f"{curve_point_dir(out_dir, gone[0])}, the curve point of step {gone[0]}, was removed while the "
                      f"run was interrupted: delete {out_dir / 'checkpoint'} and rerun notebook 02 to train this method "
                      "afresh.")


def _summary(vlm, method, data, cfg, key, log, stopped, plan, images) -> dict:
    return {"method": cfg.method, "key": key, "preset": vlm.preset,
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
            "steps_done": len(log), "stopped_by": stopped or f"step limit {cfg.steps}",
            "train_seconds": round(sum(r["seconds"] for r in log), 2),
            "rows_per_step": {k: len(v) for k, v in step_rows(vlm, method, data, plan[0], images).items()},
            "image_rows_per_step": len(plan[0]["forget"]) * (2 if method.mismatch else 1) if method.images else 0,
            # the steps of the training curve: those kept under curve/ and the last (the final adapter)
            "curve": {"points": cfg.curve_points,
                      "steps": [s for s in curve_steps(cfg.steps, cfg.curve_points) if s < len(log)] + [len(log)]}}


def _save_weights(model, cfg: TrainConfig, folder: Path) -> None:
    """The trained weights as stages 03-05 read them: the LoRA adapter (folder/adapter/, fp32 so a resumed run hashes
    equal) or the LLM's weights (folder/llm.safetensors)."""
    if cfg.lora:
        save_adapter(model, folder / "adapter", dtype=torch.float32)
    else:
        from safetensors.torch import save_file

        save_file(_trainable_state(model.trained), str(folder / "llm.safetensors"))


def _keep_curve_point(out_dir: Path, model, cfg: TrainConfig, step: int) -> None:
    """The weights after `step`, written atomically to curve/step-NNNN/ (a rerun of the step rewrites them equal)."""
    with atomic_dir(curve_point_dir(out_dir, step)) as tmp:
        _save_weights(model, cfg, tmp)


def _curve_hashes(out_dir: Path, kept: list[int]) -> dict[str, str]:
    """relative path -> SHA-256 of the kept curve points' files, for summary.json's "files" (method_problem checks
    them as it checks the final adapter)."""
    hashes = {}
    for step in kept:
        folder = curve_point_dir(out_dir, step)
        hashes.update({f"{folder.relative_to(out_dir)}/{name}": h for name, h in file_hashes(folder).items()})
    return hashes


def _save_result(out_dir: Path, model, cfg: TrainConfig, log: list[dict], summary: dict) -> None:
    """The finished run's files, written atomically and then moved into the method's folder (RESULT_FILES); the
    kept curve points (written during training) are hashed beside them and their scratch leftovers removed."""
    kept = summary["curve"]["steps"][:-1]
    for leftover in (out_dir / CURVE_DIR).glob(".*"):  # a scratch copy of a run killed mid-write
        shutil.rmtree(leftover, ignore_errors=True)
    with atomic_dir(out_dir / "result") as tmp:
        _save_weights(model, cfg, tmp)
        write_csv(pd.DataFrame(log), tmp / "losses.csv")
        # checked before anything trusts them (resume, stages 03-05)
        summary["files"] = {**file_hashes(tmp), **_curve_hashes(out_dir, kept)}
        write_json(tmp / "summary.json", summary)
    for name in RESULT_FILES:
        src, dst = out_dir / "result" / name, out_dir / name
        if dst.is_dir():
            shutil.rmtree(dst)
        elif dst.exists():
            dst.unlink()
        if src.exists():
            src.rename(dst)
    shutil.rmtree(out_dir / "result", ignore_errors=True)


RESULT_FILES = ("adapter", "llm.safetensors", "losses.csv", "summary.json")  # what train() leaves in a method's folder


def method_problem(method_dir) -> str | None:
    """None when a method's folder holds a finished run whose files (adapter or LLM weights, losses) still have the
    content recorded in its summary.json when they were written; else what is wrong, naming the file."""
    from safetensors import SafetensorError, safe_open

    method_dir = Path(method_dir)
    try:
        summary = json.loads((method_dir / "summary.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{method_dir / 'summary.json'} is missing (the run did not finish)"
    except (OSError, ValueError):
        return f"{method_dir / 'summary.json'} is damaged"
    files = summary.get("files") if isinstance(summary, dict) else None
    if not isinstance(files, dict) or not files:
        return f"{method_dir / 'summary.json'} records no file hashes (written by an older tu)"
    damaged = damaged_files(method_dir, files)
    if damaged:
        return f"{method_dir / damaged[0]} is missing or changed since it was written (SHA-256 differs)"
    for name in files:
        if name.endswith(".safetensors"):
            try:
                with safe_open(str(method_dir / name), framework="pt"):
                    pass
            except (SafetensorError, OSError) as e:
                return f"{method_dir / name} cannot be read ({e})"
    return None


def finished_summary(method_dir, key: str) -> dict | None:
    """The summary of this exact run (same key) when it finished and its files are intact; a damaged finished
    run is named and trained again."""
    summary_file = Path(method_dir) / "summary.json"
    try:
        summary = json.loads(summary_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        summary = None
    if not isinstance(summary, dict) or summary.get("key") != key:
        return None
    problem = method_problem(method_dir)
    if problem:
        print(f"{problem}: training {summary.get('method', Path(method_dir).name)} again")
        return None
    return summary


def curve_checkpoints(method_dir) -> list[tuple[int, Path | None]]:
    """(step, folder) of every point of a finished run's training curve, in step order: (0, None) for the base model,
    then the weights kept under curve/ (curve_points), then the final weights at the last step (the method's own
    folder). Each folder is what models.adapter_applied takes. A run whose files are missing or changed since they
    were written is refused, naming the file; a run from before curve points has just base and final."""
    method_dir = Path(method_dir)
    problem = method_problem(method_dir)
    if problem:
        raise TuError(f"The training curve of {method_dir} cannot be trusted: {problem}. Rerun notebook 02 for this "
                      "method (it trains a damaged method again).")
    summary = json.loads((method_dir / "summary.json").read_text(encoding="utf-8"))
    *kept, last = (summary.get("curve") or {}).get("steps") or [summary["steps_done"]]
    return [(0, None), *((s, curve_point_dir(method_dir, s)) for s in kept), (last, method_dir)]
