"""Stage 02 — unlearning every chosen method (methods), a quick before/after check and the loss curves."""
from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from .. import judges, models
from ..core import stats
from ..core.files import claim_output_dir, read_jsonl, write_json
from ..core.params import resolve_path
from ..core.plots import theme
from ..core.records import run_record
from ..core.stats import fmt_rate
from ..data.sets import stage01_file
from ..methods.config import TrainConfig
from ..methods.data import UnlearnData, forget_answers, load_sets, mismatch_pool
from ..methods.params import NOTEBOOK, SPEC, resolve_params
from ..methods.run import train
from ..models.adapters import adapter_applied
from ..models.generate import generate
from ..render.pages import FIGSTEP_TEXT_PROMPT

__all__ = ["prepare_data", "check_asr", "loss_frame", "loss_figure", "train_all", "check_table", "write_record",
           "main", "SPEC", "resolve_params", "load_sets", "adapter_applied"]


def prepare_data(vlm, P: dict) -> UnlearnData:
    forget, retain, inputs = load_sets(P["data_dir"], P["n_forget"], P["preset"])
    rows = forget_answers(vlm, forget, P["answer_tokens"], claim_output_dir(resolve_path(P["out_dir"]), NOTEBOOK))
    normal = [{"prompt": r["prompt"], "answer": r["answer"]} for r in retain]
    return UnlearnData(forget=rows, normal=normal, mismatch_answers=mismatch_pool(retain), inputs=inputs)


# ---------------------------------------------------------------------------------------------
# quick check and figure


def check_asr(vlm, data_dir, n: int, max_new_tokens: int = 32) -> dict:
    """Keyword ASR on the first n held-out T1 (AdvBench text) and V1 (FigStep images) items: a quick
    before/after signal only; notebook 03 is the evaluation."""
    t1 = read_jsonl(stage01_file(data_dir, "t1_advbench"))[:n]
    v1 = read_jsonl(stage01_file(data_dir, "v1_figstep"))[:n]
    texts = [vlm.chat(r["prompt"], False) for r in t1] + [vlm.chat(FIGSTEP_TEXT_PROMPT, True) for _ in v1]
    images = [None] * len(t1) + [vlm.render(r["image_text"], "figstep") for r in v1]
    answers = generate(vlm.model, vlm.processor, texts, images, max_new_tokens=max_new_tokens, desc="check")
    refused = judges.RefusalKeywordJudge().judge(None, answers)
    return {"t1_advbench": stats.rate(~refused[:len(t1)]), "v1_figstep": stats.rate(~refused[len(t1):]),
            "examples": answers[:1] + answers[len(t1):len(t1) + 1]}


def loss_frame(out_dir, methods: list[str]) -> pd.DataFrame:
    frames = []
    for m in methods:
        df = pd.read_csv(Path(out_dir) / m / "losses.csv")
        keep = [c for c in ("forget_nll", "mismatch_nll", "kl", "loss") if c in df.columns]
        frames.append(df.melt(id_vars=["step"], value_vars=keep, var_name="term").assign(method=m))
    return pd.concat(frames, ignore_index=True)


def loss_figure(frame: pd.DataFrame):
    """One panel per logged term, one line per method."""
    import matplotlib.pyplot as plt
    import seaborn as sns


    theme()
    terms = list(dict.fromkeys(frame["term"]))
    fig, axes = plt.subplots(1, len(terms), figsize=(4.2 * len(terms), 3.6), squeeze=False)
    titles = {"forget_nll": "NLL of the forget target\n(harmful answer; refusal for SFT)", "mismatch_nll": "NLL of random normal answers",
              "kl": "KL(frozen ‖ current) on normal data", "loss": "total loss"}
    for ax, term in zip(axes[0], terms):
        sns.lineplot(data=frame[frame["term"] == term], x="step", y="value", hue="method", ax=ax, legend=ax is axes[0][0])
        ax.set(title=titles.get(term, term), xlabel="step", ylabel="")
    fig.tight_layout()
    return fig


def train_all(vlm, data: UnlearnData, P: dict, after=None) -> dict:
    """Train every method of P["methods"] into out_dir/<method>/; `after(method, summary)` runs after each
    (the notebook's quick check). Returns the summaries."""
    summaries = {}
    for name in P["methods"]:
        summaries[name] = train(vlm, data, TrainConfig.from_params(P, name), resolve_path(P["out_dir"]) / name)
        if after is not None:
            after(name, summaries[name])
    return summaries


def check_table(checks: dict, summaries: dict) -> pd.DataFrame:
    """Quick-check rows: per model, keyword ASR on the T1 and V1 slices (n and 95% CI), steps and stop reason."""
    rows = []
    for name, c in checks.items():
        s = summaries.get(name, {})
        rows.append({"model": name, "steps": s.get("steps_done", 0), "stopped_by": s.get("stopped_by", "-"),
                     "T1 AdvBench ASR": fmt_rate(c["t1_advbench"]), "V1 FigStep ASR": fmt_rate(c["v1_figstep"])})
    return pd.DataFrame(rows)


def write_record(P: dict, data: UnlearnData, summaries: dict, checks: dict, started: float) -> Path:
    """run_record.json and check.json in out_dir (the adapters are already in out_dir/<method>/)."""
    out = claim_output_dir(resolve_path(P["out_dir"]), NOTEBOOK)
    write_json(out / "check.json", {k: {s: v[s] for s in ("t1_advbench", "v1_figstep")} for k, v in checks.items()})
    write_json(out / "run_record.json", run_record(
        P, data.inputs, started, seeds={"schedule": P["seed"]},
        methods={m: {k: s[k] for k in ("steps_done", "stopped_by", "train_seconds")} for m, s in summaries.items()}))
    return out


def main(argv: list[str]) -> None:
    """`python -m tu_lib.stages.unlearn name=value ...` (or under `accelerate launch`): notebook 02's training without
    the notebook, e.g. `accelerate launch --num_processes 2 -m tu_lib.stages.unlearn profile=paper` (at most batch_size processes)."""
    import yaml


    given = {}
    for arg in argv:
        if "=" not in arg:
            raise SystemExit(f"arguments are name=value (notebook 02's parameters), got {arg!r}")
        k, v = arg.split("=", 1)
        given[k] = yaml.safe_load(v)
    started = time.time()
    P = resolve_params(given)
    load_sets(P["data_dir"], P["n_forget"], P["preset"])  # fail before loading a model
    vlm = models.load_vlm(P["preset"], dtype=P["dtype"], local_dir=P["model_dir"] or None)  # device auto: a GPU if any
    data = prepare_data(vlm, P)
    summaries = train_all(vlm, data, P, after=lambda m, s: print(f"{m}: {s['steps_done']} steps, {s['stopped_by']}"))
    print("record:", write_record(P, data, summaries, {}, started))


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
