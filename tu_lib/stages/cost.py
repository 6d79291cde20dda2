"""Stage 04: the compute cost of textual vs multimodal unlearning, measured here and counted analytically.

The analytic count and what a step of stage 02 is: tu_lib.analysis.flops.

The notebook measures stage 02's own settings (its profile's config): wall time per step (repeats, medians
with min-max), tokens, peak memory; then extrapolates the same formulas to the paper profile on LLaVA-1.5.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from ..analysis.flops import GPUS, Batch, Shape, llava_shape, step_flops
from ..core import params
from ..core.errors import ParameterError, TuError
from ..core.files import claim_output_dir, sha256_file, write_csv, write_json
from ..core.params import Param, Spec, fraction, positive, resolve_path
from ..core.plots import theme
from ..core.records import run_record
from ..core.text import as_list
from ..data.sets import ATTACK_SETS
from ..evaluation.curves import cost_figure, costed_curve, matched_costs
from ..methods.base import ImageCache, step_loss, step_order, step_rows
from ..methods.config import TrainConfig
from ..methods.params import resolve_params as resolve_stage02_params
from ..methods.registry import METHODS
from ..methods.run import schedule, wrap_model
from ..training.batches import encode_rows
from ..training.loop import Optimiser, linear_decay, run_steps

__all__ = ["NOTEBOOK", "TEXTUAL", "MULTIMODAL", "SPEC", "resolve_params", "batch_of", "measure_method",
           "step_batches", "count_step", "first_step", "count_one_step", "summarise", "stage02_runs", "ratio_table",
           "asr_per_compute", "step_shapes", "extrapolate", "ratio_curve", "steps_figure", "ratio_figure",
           "curve_costs", "matched_costs", "cost_figure", "write_outputs", "input_hashes"]


NOTEBOOK = "04_cost"
TEXTUAL, MULTIMODAL = "textual_ga", "multimodal_ga"


# ---------------------------------------------------------------------------------------------
# notebook parameters


def _methods_check(v):
    bad = [m for m in v if m not in METHODS]
    if bad:
        return f"names unknown method(s) {bad}; choose from {list(METHODS)}"
    return None if v else "must name at least one method"


SPEC = Spec(NOTEBOOK, [
    Param("profile", (str,), "default", "settings profile: smoke, default (organism, CPU) or paper; stage 02's settings "
          "are read from the same profile"),
    Param("methods", (list, str), None, "stage 02 methods to time (list or comma-separated)", profiled=True),
    Param("preset", (str, type(None)), None, "model preset to time; None: stage 02's, from the same profile"),
    Param("model_dir", (str,), "", "local folder of a llava-hf checkpoint (paper presets without the hub)", folder=True),
    Param("unlearn_dir", (str, type(None)), None, "stage 02's output folder (its run records); None: the profile's", kind="path"),
    Param("steps", (int,), None, "timed optimizer steps per repeat (after one untimed warm-up step)", positive, profiled=True),
    Param("repeats", (int,), None, "repeats of the timed steps (medians with min-max)", positive, profiled=True),
    Param("gpu_utilisation", (float,), 0.4, "fraction of a GPU's peak bf16 FLOP/s that training sustains (for GPU-hours)",
          fraction),
    Param("eval_dir", (str,), None, "stage 03's output folder (ASR per unit of compute, when present)", profiled=True, kind="path"),
    Param("out_dir", (str,), None, "where the measurements and tables go", profiled=True, kind="output"),
    Param("fig_dir", (str,), None, "folder for the figures and their CSVs", profiled=True, kind="figures"),
])


def resolve_params(namespace: dict) -> tuple[dict, dict]:
    """(this notebook's parameters, stage 02's parameters of the same profile): the steps timed here are
    stage 02's steps, with its model, data, LoRA and batch settings."""
    raw = params.user_variables(namespace)
    fixed = {"methods": as_list(raw["methods"])} if isinstance(raw.get("methods"), (str, tuple)) else {}
    P = params.resolve(SPEC, {**namespace, **fixed})
    P["methods"] = as_list(P["methods"])
    problem = _methods_check(P["methods"])
    if problem:
        raise ParameterError(f"Parameter methods={P['methods']!r} {problem}.")
    # stage 02's settings of the same profile, with the model and folder this run names (a 13B run, a local checkpoint)
    given = {"preset": P["preset"], "model_dir": P["model_dir"], "out_dir": P["unlearn_dir"]}
    P02 = resolve_stage02_params({"profile": P["profile"], "methods": P["methods"],
                                  **{k: v for k, v in given.items() if v}})
    if not P02["lora"]:
        raise ParameterError("The cost model counts LoRA steps; stage 02's profile trains the full LLM (lora False).")
    return P, P02


# ---------------------------------------------------------------------------------------------
# measurement on the machine at hand


class _PeakRSS:
    """Peak resident memory of the process while the block runs, sampled every 5 ms in a thread (on a GPU,
    measure_method also records torch.cuda.max_memory_allocated). Process-wide: it includes the model."""

    def __enter__(self):
        import psutil

        self._proc, self._stop = psutil.Process(), threading.Event()
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def peak_mb(self) -> float:
        return self.peak / 2 ** 20


def batch_of(encoded: dict, image_token_id: int | None = None) -> Batch:
    real = encoded["attention_mask"].bool()
    image = int(((encoded["input_ids"] == image_token_id) & real).sum()) if image_token_id is not None else 0
    return Batch(rows=int(encoded["input_ids"].shape[0]), width=int(encoded["input_ids"].shape[1]),
                 answer_tokens=int((encoded["labels"][:, 1:] != -100).sum()), images=len(encoded.get("pixel_values", [])),
                 text_tokens=int(real.sum()) - image, image_tokens=image)


def measure_method(vlm, data, P02: dict, method: str, *, steps: int, repeats: int, desc: str | None = None) -> list[dict]:
    """Time `repeats` x `steps` real training steps of a stage 02 method (after one untimed warm-up step): the same
    step stage 02 takes (its loss, update, clipping and LR schedule through training.loop), each row with its tokens,
    analytic FLOPs and process peak memory. The model is left as it was."""
    import torch

    cfg = replace(TrainConfig.from_params(P02, method), steps=1 + steps * repeats)
    m, shape = METHODS[method], Shape.from_vlm(vlm)
    plan, images = schedule(cfg, data), ImageCache(vlm)
    torch.manual_seed(cfg.seed)
    model, params, reference = wrap_model(vlm, cfg)
    optimiser = Optimiser(params, cfg.lr, linear_decay(cfg.steps))
    device = next(model.parameters()).device
    gpu = device.type == "cuda"  # kernels run asynchronously there: synchronise around the clock, read GPU memory
    out = []

    def step(i: int) -> None:
        rows = step_rows(vlm, m, data, plan[i], images)
        trained, ref = step_batches(vlm, rows)
        if gpu:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        with _PeakRSS() as mem:
            t0 = time.perf_counter()
            loss, _ = step_loss(model, reference, m, cfg, vlm, rows)
            optimiser.update(loss)
            if gpu:
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - t0
        if i == 0:
            return  # warm-up: first-call allocations and kernel choices
        flops = step_flops(shape, trained, ref, first_layer=cfg.lora_first_layer, lora_r=cfg.lora_r,
                           lora_targets=cfg.lora_targets)
        out.append({"method": method, "repeat": (i - 1) // steps, "step": i, "seconds": seconds,
                    "text_tokens": trained.text_tokens, "image_tokens": trained.image_tokens, "images": trained.images,
                    "padded_positions": trained.rows * trained.width,
                    "gflop": flops["total"] / 1e9, "peak_rss_mb": mem.peak_mb,
                    **({"peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2 ** 20} if gpu else {})})

    try:
        model.train()
        run_steps(step, cfg.steps, desc=desc or method)
    finally:
        vlm.model = model.unload()
    return out


def step_batches(vlm, rows: dict[str, list]) -> tuple[Batch, Batch | None]:
    """Shapes of a stage 02 step's two forwards: all rows (trained), and the normal rows (KL reference)."""

    image_id = vlm.base_model.config.image_token_id
    trained = batch_of(encode_rows(vlm, step_order(rows)), image_id)
    return trained, batch_of(encode_rows(vlm, rows["normal"]), image_id) if rows["normal"] else None


def count_step(vlm, cfg, rows: dict[str, list]) -> dict:
    """One real step on `rows` under torch's FLOP counter beside the analytic count (the formulas' check)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode


    analytic = step_flops(Shape.from_vlm(vlm), *step_batches(vlm, rows), first_layer=cfg.lora_first_layer,
                          lora_r=cfg.lora_r, lora_targets=cfg.lora_targets)
    torch.manual_seed(cfg.seed)
    model, _, reference = wrap_model(vlm, cfg)
    try:
        with FlopCounterMode(display=False) as counter:
            loss, _ = step_loss(model, reference, METHODS[cfg.method], cfg, vlm, rows)
            loss.backward()
    finally:
        vlm.model = model.unload()
    counted = counter.get_total_flops()
    return {"method": cfg.method, "analytic_gflop": analytic["total"] / 1e9, "counted_gflop": counted / 1e9,
            "analytic_over_counted": analytic["total"] / counted, **{k: v / 1e9 for k, v in analytic.items() if k != "total"}}


def first_step(vlm, data, P02: dict, method: str):
    """(config, rows) of stage 02's first step of `method`."""

    cfg = replace(TrainConfig.from_params(P02, method), steps=1)
    return cfg, step_rows(vlm, METHODS[method], data, schedule(cfg, data)[0], ImageCache(vlm))


def count_one_step(vlm, data, P02: dict, method: str) -> dict:
    return count_step(vlm, *first_step(vlm, data, P02, method))


# ---------------------------------------------------------------------------------------------
# tables


def summarise(measured: pd.DataFrame) -> pd.DataFrame:
    """Per method: median seconds per step with min-max, tokens, GFLOP, peak memory (process RSS; on a GPU also
    torch's peak allocation), achieved GFLOP/s."""
    g = measured.groupby("method", sort=False)
    out = pd.DataFrame({
        "steps_timed": g.size(),
        "seconds_median": g["seconds"].median(), "seconds_min": g["seconds"].min(), "seconds_max": g["seconds"].max(),
        "text_tokens": g["text_tokens"].median(), "image_tokens": g["image_tokens"].median(),
        "padded_positions": g["padded_positions"].median(), "gflop_per_step": g["gflop"].median(),
        "peak_rss_mb": g["peak_rss_mb"].max(),
    }).reset_index()
    if "peak_gpu_mb" in measured:  # measured on a GPU
        out["peak_gpu_mb"] = g["peak_gpu_mb"].max().to_numpy()
    out["achieved_gflops"] = out["gflop_per_step"] / out["seconds_median"]
    return out


def stage02_runs(unlearn_dir, methods: list[str]) -> pd.DataFrame:
    """Stage 02's own runs: steps done, why they stopped, total and median per-step wall time."""
    rows = []
    for method in methods:
        folder = Path(unlearn_dir) / method
        if not (folder / "summary.json").is_file():
            raise TuError(f"{folder}/summary.json is missing: run stage 02 for {method!r} first (notebook 02, same profile).")
        summary = json.loads((folder / "summary.json").read_text())
        losses = pd.read_csv(folder / "losses.csv")
        rows.append({"method": method, "steps_done": summary["steps_done"], "stopped_by": summary["stopped_by"],
                     "train_seconds": summary["train_seconds"], "step_seconds_median": float(losses["seconds"].median())})
    return pd.DataFrame(rows)


def ratio_table(summary: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Multimodal over textual unlearning (and mm_sft over text_sft): measured time, analytic FLOPs, tokens."""
    s, r = summary.set_index("method"), runs.set_index("method")
    out = []
    for image_m, text_m in ((MULTIMODAL, TEXTUAL), ("mm_sft", "text_sft")):
        if image_m in s.index and text_m in s.index:
            out.append({"pair": f"{image_m} / {text_m}",
                        "seconds_per_step": s.at[image_m, "seconds_median"] / s.at[text_m, "seconds_median"],
                        "gflop_per_step": s.at[image_m, "gflop_per_step"] / s.at[text_m, "gflop_per_step"],
                        "positions_per_step": s.at[image_m, "padded_positions"] / s.at[text_m, "padded_positions"],
                        "stage02_train_seconds": r.at[image_m, "train_seconds"] / r.at[text_m, "train_seconds"]})
    return pd.DataFrame(out)


def asr_per_compute(eval_dir, summary: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame | None:
    """Mean keyword ASR over the six attack sets per method (stage 03) beside its training compute up to the
    checkpoint stage 03 evaluated (analytic GFLOP per step x that step); None when stage 03's results are missing."""
    path = Path(eval_dir) / "results.csv"
    if not path.is_file():
        return None
    res = pd.read_csv(path)
    res = res[(res["metric"] == "asr") & (res["judge"] == "refusal_keywords") & res["set"].isin(ATTACK_SETS)]
    asr = res.groupby("method")["rate"].mean()
    if "base" not in asr.index:
        return None
    out = summary.merge(runs, on="method")[["method", "gflop_per_step", "steps_done"]]
    # the step stage 03 evaluated each method at (its selection rule's pick), else the run's last
    picked = res.groupby("method")["step"].first() if "step" in res.columns else pd.Series(dtype=float)
    out["step_evaluated"] = out["method"].map(picked).fillna(out["steps_done"]).astype(int)
    out["train_pflop"] = out["gflop_per_step"] * out["step_evaluated"] / 1e6
    out["mean_attack_asr"] = out["method"].map(asr)
    out["base_mean_attack_asr"] = asr["base"]
    out["asr_drop_per_pflop"] = (out["base_mean_attack_asr"] - out["mean_attack_asr"]) / out["train_pflop"].replace(0, np.nan)
    return out.dropna(subset=["mean_attack_asr"])


# ---------------------------------------------------------------------------------------------
# safety against training cost (stage 03's validation curves)

def curve_costs(eval_dir, summary: pd.DataFrame) -> pd.DataFrame | None:
    """Stage 03's validation curve (curve.csv) with cumulative costs from this stage's measurements (costed_curve:
    median seconds per step and counted GFLOP per step, times the step); None when stage 03 scored no curve."""
    path = Path(eval_dir) / "curve.csv"
    if not path.is_file():
        return None
    return costed_curve(pd.read_csv(path), summary)


# ---------------------------------------------------------------------------------------------
# extrapolation to LLaVA-1.5


def _llava_batches(measured_row: pd.Series, organism: Shape, target: Shape, batch_scale: float) -> tuple[Batch, Batch]:
    """The organism's measured step recast for a LLaVA model: the same text per row, each image taking
    `target.image_tokens` positions instead of the organism's, rows scaled to the paper's batch size."""
    rows = max(1, round(measured_row["rows"] * batch_scale))
    width = measured_row["width"] + (target.image_tokens - organism.image_tokens) * (measured_row["images"] > 0)
    trained = Batch(rows=rows, width=int(width), answer_tokens=round(measured_row["answer_tokens"] * batch_scale),
                    images=round(measured_row["images"] * batch_scale))
    ref = Batch(rows=max(1, round(measured_row["ref_rows"] * batch_scale)), width=int(measured_row["ref_width"]),
                answer_tokens=round(measured_row["ref_answer_tokens"] * batch_scale))
    return trained, ref


def step_shapes(vlm, data, P02: dict, methods: list[str]) -> pd.DataFrame:
    """The first step's batch shapes per method (what the extrapolation recasts for LLaVA)."""
    out = []
    for method in methods:
        cfg, rows = first_step(vlm, data, P02, method)
        t, r = step_batches(vlm, rows)
        out.append({"method": method, "batch_size": cfg.batch_size, "rows": t.rows, "width": t.width,
                    "answer_tokens": t.answer_tokens, "images": t.images, "ref_rows": r.rows, "ref_width": r.width,
                    "ref_answer_tokens": r.answer_tokens})
    return pd.DataFrame(out)


def extrapolate(vlm, shapes: pd.DataFrame, paper02: dict, utilisation: float) -> pd.DataFrame:
    """FLOPs of stage 02's paper profile (batch, steps, LoRA) on LLaVA-1.5-7B/13B and GPU-hours at
    `utilisation` of each GPU's peak, from the organism's step shapes (text lengths as measured; an image
    is 576 LLaVA positions)."""
    organism = Shape.from_vlm(vlm)
    out = []
    for size in ("7b", "13b"):
        target = llava_shape(size)
        for _, row in shapes.iterrows():
            trained, ref = _llava_batches(row, organism, target, paper02["batch_size"] / row["batch_size"])
            flops = step_flops(target, trained, ref, first_layer=paper02["lora_first_layer"], lora_r=paper02["lora_r"],
                               lora_targets=paper02["lora_targets"])
            total = flops["total"] * paper02["steps"]
            rec = {"model": target.name, "method": row["method"], "steps": paper02["steps"],
                   "batch_size": paper02["batch_size"], "width": trained.width, "tflop_per_step": flops["total"] / 1e12,
                   "pflop_total": total / 1e15}
            rec.update({f"{gpu}_hours": total / (peak * utilisation) / 3600 for gpu, peak in GPUS.items()})
            out.append(rec)
    df = pd.DataFrame(out)
    text = df[df["method"] == TEXTUAL].set_index("model")["pflop_total"]
    df["vs_textual_ga"] = [r["pflop_total"] / text[r["model"]] if r["model"] in text.index else np.nan
                           for _, r in df.iterrows()]
    return df


def ratio_curve(paper02: dict, text_tokens=(16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024),
                image_tokens=(49, 196, 576), size: str = "7b") -> pd.DataFrame:
    """Multimodal / textual step FLOPs on LLaVA-1.5 as a function of the text tokens per row, for images
    of 49, 196 and 576 tokens: Yao et al.'s step (forget, mismatch and normal rows of the paper batch,
    answers a quarter of each row), the forget and mismatch rows carrying one image each. As in stage 02,
    all rows of a step run as one padded batch, so the normal rows are padded to the image rows' width."""
    s = llava_shape(size)
    b = paper02["batch_size"]
    kw = dict(first_layer=paper02["lora_first_layer"], lora_r=paper02["lora_r"], lora_targets=paper02["lora_targets"])
    out = []
    for t in text_tokens:
        answers = 3 * b * max(1, t // 4)
        ref = Batch(rows=b, width=t, answer_tokens=b * max(1, t // 4))
        text = step_flops(s, Batch(rows=3 * b, width=t, answer_tokens=answers), ref, **kw)["total"]
        for i in image_tokens:
            image = step_flops(replace(s, image_tokens=i, v_patches=i), Batch(rows=3 * b, width=t + i, answer_tokens=answers, images=2 * b),
                               ref, **kw)["total"]
            out.append({"model": s.name, "text_tokens": t, "image_tokens": i, "ratio": image / text})
    return pd.DataFrame(out)


# ---------------------------------------------------------------------------------------------
# figures and record


def steps_figure(measured: pd.DataFrame):
    """Left: wall seconds per step of each method (every timed step, median marked). Right: analytic GFLOP
    per step, split into image and text positions by the step's token counts."""
    import matplotlib.pyplot as plt
    import seaborn as sns


    theme()
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    sns.stripplot(data=measured, x="seconds", y="method", ax=axes[0], color="#4c72b0", size=6, jitter=0.15)
    med = measured.groupby("method", sort=False)["seconds"].median()
    axes[0].scatter(med.values, range(len(med)), marker="|", s=600, color="black", label="median")
    axes[0].set(title="Wall time per training step (this machine)", xlabel="seconds", ylabel="")
    axes[0].legend(loc="lower right")
    g = measured.groupby("method", sort=False)[["gflop", "text_tokens", "image_tokens"]].median()
    share = g["image_tokens"] / (g["image_tokens"] + g["text_tokens"])
    axes[1].barh(g.index, g["gflop"] * (1 - share), color="#4c72b0", label="text positions")
    axes[1].barh(g.index, g["gflop"] * share, left=g["gflop"] * (1 - share), color="#dd8452", label="image positions")
    axes[1].set(title="Analytic FLOPs per step", xlabel="GFLOP (matrix multiplies)")
    axes[1].invert_yaxis()
    axes[1].legend(loc="lower right")
    fig.tight_layout()
    return fig


def ratio_figure(curve: pd.DataFrame, organism_text_tokens: float | None = None):
    """Multimodal / textual FLOPs per step against text tokens per row, one line per image size; the
    paper's "up to 6x" as a reference line."""
    import matplotlib.pyplot as plt
    import seaborn as sns


    theme()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    sns.lineplot(data=curve, x="text_tokens", y="ratio", hue="image_tokens", marker="o", palette="viridis", ax=ax)
    ax.axhline(6, color="#c44e52", ls="--", lw=1)
    ax.text(curve["text_tokens"].max(), 6.2, 'paper A: "up to 6x"', color="#c44e52", ha="right", fontsize=9)
    if organism_text_tokens:
        ax.axvline(organism_text_tokens, color="grey", ls=":", lw=1)
        ax.text(organism_text_tokens * 1.05, ax.get_ylim()[1] * 0.9, "width of our textual step", color="grey", fontsize=9)
    ax.set(xscale="log", yscale="log", xlabel="text tokens per row", ylabel="multimodal / textual FLOPs per step",
           title=f"{curve['model'].iloc[0]}: where a multimodal step's extra cost comes from")
    ax.legend(title="image tokens")
    fig.tight_layout()
    return fig


def write_outputs(P: dict, P02: dict, out: Path, tables: dict[str, pd.DataFrame | None], started: float) -> None:
    """Every table as CSV in out_dir (refused before any work if it is not this stage's), and the run record."""
    claim_output_dir(out, NOTEBOOK)
    for name, table in tables.items():
        if table is not None:
            write_csv(table, out / f"{name}.csv")
    write_json(out / "run_record.json", run_record({**P, "stage02": P02}, input_hashes(P, P02), started,
                                                   seeds={"schedule": P02["seed"]}))


def input_hashes(P: dict, P02: dict) -> dict[str, str]:
    """file -> sha256 of the earlier stages' outputs this stage read: stage 02's run summaries and loss curves of the
    timed methods, and stage 03's results and curve when present."""
    unlearn_dir = resolve_path(P02["out_dir"])
    files = [unlearn_dir / m / name for m in P["methods"] for name in ("summary.json", "losses.csv")]
    files += [p for p in [resolve_path(P["eval_dir"]) / n for n in ("results.csv", "curve.csv")] if p.is_file()]
    return {str(p): sha256_file(p) for p in files}
