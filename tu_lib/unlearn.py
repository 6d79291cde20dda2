"""Stage 02 — unlearning harmful behaviour in the LLM inside the VLM, and the baselines it is compared with.

Every method is a forget-side loss over one shared training loop (a registry, as in open-unlearning):

| method          | forget prompts shown as | forget-side loss                                                    |
|-----------------|-------------------------|---------------------------------------------------------------------|
| `textual_ga`    | text                    | 0.5·(−NLL of the harmful answer) + 1·NLL of a random normal answer  |
| `multimodal_ga` | typographic images      | the same, with the prompt rendered FigStep- or MM-SafetyBench-style |
| `text_sft`      | text                    | NLL of a refusal                                                    |
| `mm_sft`        | typographic images      | NLL of a refusal (VLGuard-style refusal tuning)                     |
| `npo`           | text                    | NPO (Zhang et al. 2024) on the harmful answer, β = `npo_beta`       |

Every method adds the same normal-side term, 1·KL(p_frozen ‖ p_current) on normal data (TruthfulQA
question/best-answer pairs), with the frozen reference obtained by disabling the LoRA adapter (no model
copy). This is Yao et al.'s recipe (arXiv 2310.10683; `llm_unlearn`), whose code computes the same KL
up to the reference's entropy, a constant. Only the LLM is updated: LoRA on the language model's decoder
linears (or full fine-tuning of the language model).

Forget answers: for the organism, the pre-alignment backbone's own answers to the forget prompts
(generated here and cached; never hand-written); for the paper presets, PKU-SafeRLHF unsafe responses
(stage 01 with forget_source='pku_saferlhf').

The loop checkpoints adapter, optimizer, scheduler and RNG every `checkpoint_every` steps; a rerun with
the same arguments resumes and ends bit-identical to an uninterrupted run. The batch of every step is a
deterministic function of the seed, so resuming needs no data-loader state. Yao et al.'s stop rule ends
ascent methods when the forget NLL passes `max_forget_nll`. With `accelerate launch --num_processes N`,
each process takes a slice of every step's rows and gradients are averaged across processes.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .core import (ParameterError, TuError, atomic_dir, claim_output_dir, damaged_files, file_hashes, hash_problem,
                   read_jsonl, record_hash, run_record, write_csv, write_json, write_jsonl)
from .params import Param, Spec, dtype_value, non_negative, positive, positive_size, seed_value
from .train import answer_logits, apply_adapter, per_row_mean, save_adapter

NOTEBOOK = "02_unlearn"
REFUSAL = "I'm sorry, but I can't help with that."
# Generic instruction sent with an image that holds a forget question (MM-SafetyBench style; FigStep's
# own benign prompt is used for the FigStep-style page).
MMSB_QUESTION_PROMPT = "The image shows a question. Answer it in detail."


@dataclass(frozen=True)
class Method:
    name: str
    objective: str  # "ga" (ascent + mismatch), "sft" (refusal), "npo"
    images: bool  # forget prompts rendered as typographic images
    doc: str


METHODS = {m.name: m for m in [
    Method("textual_ga", "ga", False, "gradient ascent on harmful answers + random-mismatch NLL, text only (paper A)"),
    Method("multimodal_ga", "ga", True, "the same objective with the forget prompts shown as typographic images"),
    Method("text_sft", "sft", False, "refusal SFT on the forget prompts in text"),
    Method("mm_sft", "sft", True, "refusal SFT on the forget prompts shown as images (VLGuard-style)"),
    Method("npo", "npo", False, "negative preference optimisation on harmful answers, text only (optional extra)"),
]}
PAPER_METHODS = ["textual_ga", "multimodal_ga", "text_sft", "mm_sft"]


# ---------------------------------------------------------------------------------------------
# parameters


def _methods_check(v):
    bad = [m for m in v if m not in METHODS]
    if bad or not v:
        return f"names unknown method(s) {bad}; choose from {list(METHODS)}" if bad else "must name at least one method"
    if len(set(v)) != len(v):
        return "names a method twice"
    return None


def _targets_check(v):
    from .models import _LM_LINEARS

    if not v or not all(isinstance(n, str) and n.isidentifier() for n in v):
        return "must be module names like ['q_proj', 'v_proj']"
    unknown = [n for n in v if n not in _LM_LINEARS]
    # every preset's LLM is Llama-shaped (Vicuna, SmolLM2, the micro Llama): these are its decoder-layer linears
    return f"names {unknown}, which are not decoder-layer linears of the LLM ({', '.join(_LM_LINEARS)})" if unknown else None


def _as_list(value):
    """papermill's -p passes strings: accept "a,b" as well as a YAML/Python list."""
    if isinstance(value, str):
        return [x.strip() for x in value.split(",") if x.strip()]
    return list(value)


SPEC = Spec(NOTEBOOK, [
    Param("profile", (str,), "default", "settings profile: smoke, default (the organism on CPU) or paper (LLaVA-1.5-7B, GPU)"),
    Param("preset", (str,), None, "model preset: micro, organism, llava-1.5-7b or llava-1.5-13b", profiled=True),
    Param("methods", (list, str), None, f"methods to train, from {list(METHODS)} (list or comma-separated)", profiled=True),
    Param("steps", (int,), None, "maximum optimizer steps per method", positive, profiled=True),
    Param("lr", (float,), None, "AdamW learning rate (linear decay, no warm-up, as Yao et al.)", positive, profiled=True),
    Param("batch_size", (int,), None, "forget prompts per step (as many mismatch and normal rows)", positive, profiled=True),
    Param("lora", (bool,), True, "LoRA on the LLM (True) or full fine-tuning of the LLM (False)"),
    Param("lora_r", (int,), None, "LoRA rank", positive, profiled=True),
    Param("lora_alpha", (int,), None, "LoRA alpha", positive, profiled=True),
    Param("lora_targets", (list, str), None, "LLM linears that get adapters (list or comma-separated)", profiled=True),
    Param("lora_first_layer", (int,), None, "first decoder layer with adapters (later layers too); 0: all", non_negative,
          profiled=True),
    Param("ga_weight", (float,), 0.5, "weight of the gradient-ascent term (Yao et al.: 0.5)", non_negative),
    Param("mismatch_weight", (float,), 1.0, "weight of the random-mismatch NLL term (Yao et al.: 1)", non_negative),
    Param("kl_weight", (float,), 1.0, "weight of the KL-to-frozen term on normal data (Yao et al.: 1)", non_negative),
    Param("npo_beta", (float,), 0.1, "β of NPO", positive),
    Param("max_forget_nll", (float,), 100.0, "stop rule: ascent methods stop once the forget NLL exceeds this (Yao et al.: 100)",
          positive),
    Param("n_forget", (int, str), None, "forget prompts used (int or 'all')", positive_size, profiled=True),
    Param("answer_tokens", (int,), 32, "length of the generated forget answers (organism, micro)", positive),
    Param("checkpoint_every", (int,), None, "steps between resumable checkpoints", positive, profiled=True),
    Param("n_check", (int,), None, "prompts per set in the quick before/after ASR check (0: skip)", non_negative, profiled=True),
    Param("seed", (int,), 0, "seed of the batch schedule and initialisation", seed_value),
    Param("dtype", (str,), "auto", "model dtype: auto (float32 on a CPU, bf16 on a GPU), float32 or bfloat16",
          dtype_value),
    Param("model_dir", (str,), "", "local folder of a llava-hf checkpoint (paper presets without the hub)", folder=True),
    Param("data_dir", (str,), None, "stage 01's output folder (the curated sets)", profiled=True, kind="path"),
    Param("out_dir", (str,), None, "where adapters, loss curves and run records go", profiled=True, kind="output"),
    Param("fig_dir", (str,), None, "folder for the loss-curve figure and its CSV", profiled=True, kind="figures"),
])


def resolve_params(namespace: dict) -> dict:
    """Validate the notebook's parameters (before any model is loaded)."""
    from . import models, params

    raw = params.user_variables(namespace)
    for key in ("methods", "lora_targets"):
        if isinstance(raw.get(key), (str, tuple)):
            namespace = {**namespace, key: _as_list(raw[key])}
    P = params.resolve(SPEC, namespace)
    for key, check in (("methods", _methods_check), ("lora_targets", _targets_check)):
        P[key] = _as_list(P[key])
        problem = check(P[key])
        if problem:
            raise ParameterError(f"Parameter {key}={P[key]!r} {problem}.")
    if P["preset"] not in models.PRESETS:
        raise ParameterError(f"Unknown model preset {P['preset']!r}; valid presets: {', '.join(models.PRESETS)}.")
    return P


# ---------------------------------------------------------------------------------------------
# data


@dataclass
class UnlearnData:
    forget: list[dict]  # {"prompt", "answer"} harmful prompt with the answer to unlearn
    normal: list[dict]  # {"prompt", "answer"} TruthfulQA question with its best answer
    mismatch_answers: list[str]  # pooled TruthfulQA answers (random-mismatch targets)
    inputs: dict = field(default_factory=dict)  # file -> sha256, for the run record


def stage01_file(data_dir, name: str) -> Path:
    from .params import resolve_path

    path = resolve_path(str(data_dir)) / "sets" / f"{name}.jsonl"
    if not path.is_file():
        raise TuError(f"{path} is missing: run stage 01 first (`papermill notebooks/01_data.ipynb runs/01_data.ipynb`, "
                      f"or `make reproduce`), or point data_dir at its output folder.")
    return path


def load_sets(data_dir, n_forget, preset: str | None = None) -> tuple[list[dict], list[dict], dict]:
    """Forget and retain rows from stage 01's files (the stages meet only through files). With `preset`, also
    checks, before any model is loaded, that the forget rows carry answers where the preset cannot make them."""
    from .core import sha256_file

    paths = {name: stage01_file(data_dir, name) for name in ("forget", "retain")}
    forget, retain = read_jsonl(paths["forget"]), read_jsonl(paths["retain"])
    if not forget or not retain:
        raise TuError(f"Stage 01's forget or retain set under {data_dir} is empty; rerun notebook 01 with sizes > 0.")
    if n_forget != "all":
        forget = forget[: int(n_forget)]
    if preset is not None and preset not in ANSWERING_PRESETS and not all(r.get("answer") for r in forget):
        raise TuError(_NEEDS_ANSWERS.format(preset=preset))
    return forget, retain, {str(p): sha256_file(p) for p in paths.values()}


def mismatch_pool(retain: list[dict]) -> list[str]:
    """Yao et al.'s random answers: TruthfulQA best, correct and incorrect answers pooled."""
    pool = []
    for row in retain:
        pool.append(row["answer"])
        for key in ("correct_answers", "incorrect_answers"):
            pool += [a.strip() for a in str(row.get(key) or "").split(";") if a.strip()]
    return sorted(set(pool))


def _answers_key(preset: str, weights: str, answer_tokens: int) -> str:
    """Name of a forget-answers cache: what wrote the answers (the pre-alignment model's weights fingerprint,
    which covers its dtype) and how many tokens each answer got."""
    return f"{preset}-{hashlib.sha256(f'{weights}|{answer_tokens}'.encode()).hexdigest()[:10]}"


ANSWERING_PRESETS = ("organism", "micro")  # presets whose pre-alignment model writes the answers to unlearn
_NEEDS_ANSWERS = ("The {preset} preset unlearns PKU-SafeRLHF's unsafe answers: rerun stage 01 with "
                  "`-p forget_source pku_saferlhf` (profile paper) so the forget set carries answers.")


def pre_alignment_model(vlm):
    """(model, processor, chat) of the model before safety alignment, whose compliant answers are the ones
    to unlearn: the raw SmolLM2 backbone for the organism, the (random) model itself for micro."""
    from . import organism

    if vlm.preset == "organism":
        lm, tok = organism.load_backbone()
        return lm.eval(), organism._TextOnly(tok), lambda p: organism.chat(tok, p)
    if vlm.preset == "micro":
        return vlm.model, vlm.processor, lambda p: vlm.chat(p, False)
    raise TuError(_NEEDS_ANSWERS.format(preset=vlm.preset))


def forget_answers(vlm, forget: list[dict], answer_tokens: int, cache_dir: Path) -> list[dict]:
    """The answers to unlearn, one per forget prompt. Rows that carry an answer (PKU-SafeRLHF) keep it;
    otherwise the pre-alignment model's greedy answer, generated once and cached (a JSONL keyed by prompt,
    rewritten whole and atomically, so a larger forget set only generates the new prompts). The cache is named
    by the weights fingerprint of the model that writes the answers (its dtype included), so answers of
    other weights or another dtype are never served."""
    from .generate import generate, weights_fingerprint

    if all(row.get("answer") for row in forget):
        return [{"prompt": r["prompt"], "answer": r["answer"]} for r in forget]
    model, processor, chat = pre_alignment_model(vlm)
    cache = Path(cache_dir) / f"forget_answers_{_answers_key(vlm.preset, weights_fingerprint(model), answer_tokens)}.jsonl"
    known = {}
    if cache.is_file():
        problem = hash_problem(cache)
        if problem:
            print(f"forget-answers cache {cache} {problem}: generating its answers again")
        else:
            known = {r["prompt"]: r["answer"] for r in read_jsonl(cache)}
    todo = [r["prompt"] for r in forget if r["prompt"] not in known]
    if todo:
        answers = generate(model, processor, [chat(p) for p in todo], max_new_tokens=answer_tokens, batch_size=32,
                           desc="forget answers")
        known.update(zip(todo, answers))
        write_jsonl(cache, ({"prompt": p, "answer": a} for p, a in known.items()))  # whole file, atomically
        record_hash(cache)
    return [{"prompt": r["prompt"], "answer": known[r["prompt"]]} for r in forget]


def prepare_data(vlm, P: dict) -> UnlearnData:
    from .params import resolve_path

    forget, retain, inputs = load_sets(P["data_dir"], P["n_forget"], P["preset"])
    rows = forget_answers(vlm, forget, P["answer_tokens"], claim_output_dir(resolve_path(P["out_dir"]), NOTEBOOK))
    normal = [{"prompt": r["prompt"], "answer": r["answer"]} for r in retain]
    return UnlearnData(forget=rows, normal=normal, mismatch_answers=mismatch_pool(retain), inputs=inputs)


# ---------------------------------------------------------------------------------------------
# one step's batch


@dataclass
class TrainConfig:
    method: str
    steps: int
    lr: float
    batch_size: int
    lora: bool = True
    lora_r: int = 16
    lora_alpha: int = 32
    lora_targets: tuple = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    lora_first_layer: int = 0
    ga_weight: float = 0.5
    mismatch_weight: float = 1.0
    kl_weight: float = 1.0
    npo_beta: float = 0.1
    max_forget_nll: float = 100.0
    checkpoint_every: int = 10
    seed: int = 0

    @classmethod
    def from_params(cls, P: dict, method: str) -> "TrainConfig":
        keys = {k for k in cls.__dataclass_fields__} - {"method"}
        values = {k: P[k] for k in keys if k in P}
        values["lora_targets"] = tuple(values.get("lora_targets", cls.lora_targets))
        return cls(method=method, **values)

    def key(self, data: UnlearnData, model: str) -> str:
        """Identity of a run: the model preset, every setting and the data. A checkpoint resumes, and a finished
        run is reused, only under the same key (so a 13B run never picks up a 7B adapter from the same folder)."""
        blob = json.dumps({"model": model, "config": asdict(self), "forget": data.forget, "normal": data.normal,
                           "mismatch": data.mismatch_answers}, sort_keys=True, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


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


class ImageCache:
    """Typographic renders of forget prompts, made once per (text, style)."""

    def __init__(self, vlm):
        self.vlm, self._images = vlm, {}

    def __call__(self, text: str, style: str):
        key = (text, style)
        if key not in self._images:
            self._images[key] = self.vlm.render(text, style)
        return self._images[key]


def forget_form(vlm, method: Method, prompt: str, index: int, images: ImageCache) -> tuple[str, object]:
    """(text prompt, image) of a forget prompt for this method: the prompt itself in text, or for the
    multimodal methods the prompt rendered as an image, alternating FigStep's page (with its benign text
    prompt) and an MM-SafetyBench-style image (with a generic instruction)."""
    from .render import FIGSTEP_TEXT_PROMPT

    if not method.images:
        return prompt, None
    if index % 2 == 0:
        return FIGSTEP_TEXT_PROMPT, images(prompt, "figstep")
    return MMSB_QUESTION_PROMPT, images(prompt, "mmsb")


def step_rows(vlm, method: Method, data: UnlearnData, plan: dict, images: ImageCache) -> dict[str, list]:
    """The rows of one step by role: forget (target: harmful answer, or refusal for SFT), mismatch (GA
    only: the same prompt with a random normal answer) and normal (KL rows)."""
    rows = {"forget": [], "mismatch": [], "normal": []}
    for fi, mi in zip(plan["forget"], plan["mismatch"]):
        row = data.forget[fi]
        prompt, image = forget_form(vlm, method, row["prompt"], fi, images)
        target = REFUSAL if method.objective == "sft" else row["answer"]
        rows["forget"].append((prompt, image, target))
        if method.objective == "ga":
            rows["mismatch"].append((prompt, image, data.mismatch_answers[mi]))
    rows["normal"] = [(data.normal[i]["prompt"], None, data.normal[i]["answer"]) for i in plan["normal"]]
    return rows


def encode_rows(vlm, rows: list[tuple]) -> dict:
    from .train import encode_batch

    return encode_batch(vlm.tokenizer, vlm.processor,
                        [(vlm.chat(p, image is not None), vlm.chat_with_answer(p, image is not None, a), image)
                         for p, image, a in rows])


def shard(rows: dict[str, list], index: int, count: int) -> dict[str, list]:
    """This process's slice of every role (multi-process training with accelerate)."""
    return {k: v[index::count] for k, v in rows.items()}


# ---------------------------------------------------------------------------------------------
# losses


def token_nll(logits, targets):
    return torch.nn.functional.cross_entropy(logits, targets, reduction="none")


def kl_to_reference(logits: torch.Tensor, reference_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(reference || current) of the next-token distributions (Yao et al.'s
    utility term: the frozen model's distribution is the target, so the current model is kept where it was)."""
    cur = torch.log_softmax(logits, -1)
    ref = torch.log_softmax(reference_logits, -1)
    return (ref.exp() * (ref - cur)).sum(-1).mean()


STEP_ROLES = ("forget", "mismatch", "normal")  # the order of a step's rows in its one forward


def step_order(rows: dict[str, list]) -> list:
    """A step's rows in the order of its forward (step_loss slices the losses by this order)."""
    return [r for role in STEP_ROLES for r in rows[role]]


def step_loss(model, reference, method: Method, cfg: TrainConfig, vlm, rows: dict[str, list]) -> tuple[torch.Tensor, dict]:
    """The method's loss on one step's rows and its logged terms (floats).

    One forward of the current model over all rows; the frozen reference (`reference()` is a context
    manager under which `model` is the original) runs on the normal rows (KL) and, for NPO, on the forget rows."""
    order = step_order(rows)
    n_f, n_m, n_n = (len(rows[k]) for k in STEP_ROLES)
    batch = encode_rows(vlm, order)
    logits, targets, row = answer_logits(model, batch)
    nll_rows = per_row_mean(token_nll(logits, targets), row, len(order))
    terms, logged = [], {}
    f_nll = nll_rows[:n_f].mean()
    logged["forget_nll"] = float(f_nll.detach())
    if method.objective == "ga":
        m_nll = nll_rows[n_f:n_f + n_m].mean()
        terms += [-cfg.ga_weight * f_nll, cfg.mismatch_weight * m_nll]
        logged["mismatch_nll"] = float(m_nll.detach())
    elif method.objective == "sft":
        terms.append(f_nll)
    elif method.objective == "npo":
        keep = row < n_f
        logp = -torch.zeros(n_f, device=logits.device).index_add_(0, row[keep], token_nll(logits[keep], targets[keep]))
        with torch.no_grad(), reference():
            r_logits, r_targets, r_row = answer_logits(model, encode_rows(vlm, rows["forget"]))
            ref_logp = -torch.zeros(n_f, device=logits.device).index_add_(0, r_row, token_nll(r_logits, r_targets))
        terms.append(-(2.0 / cfg.npo_beta) * torch.nn.functional.logsigmoid(-cfg.npo_beta * (logp - ref_logp)).mean())
    if n_n and cfg.kl_weight > 0:
        keep = row >= n_f + n_m
        with torch.no_grad(), reference():
            ref_logits, _, _ = answer_logits(model, encode_rows(vlm, rows["normal"]))
        kl = kl_to_reference(logits[keep], ref_logits)
        terms.append(cfg.kl_weight * kl)
        logged["kl"] = float(kl.detach())
        logged["normal_nll"] = float(nll_rows[n_f + n_m:].mean().detach())
    loss = torch.stack(terms).sum()
    logged["loss"] = float(loss.detach())
    return loss, logged


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


def train(vlm, data: UnlearnData, cfg: TrainConfig, out_dir, *, on_step=None, desc: str | None = None) -> dict:
    """Train one method and save it under out_dir (adapter/, losses.csv, summary.json); resumes from
    out_dir/checkpoint when the same run was interrupted. Returns the summary. `on_step(step)` is called
    after every step (tests use it to interrupt a run)."""
    from accelerate import Accelerator
    from tqdm.std import tqdm

    from .generate import progress_enabled, weights_fingerprint

    if cfg.method not in METHODS:
        raise ParameterError(f"Unknown unlearning method {cfg.method!r}; choose from {list(METHODS)}.")
    if cfg.steps <= 0 or cfg.lr <= 0 or cfg.batch_size <= 0:
        raise ParameterError(f"steps, lr and batch_size must be > 0 (got {cfg.steps}, {cfg.lr}, {cfg.batch_size}).")
    method, out_dir = METHODS[cfg.method], Path(out_dir)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if accelerator.num_processes > cfg.batch_size:  # shard() would hand the extra processes empty steps
        raise ParameterError(f"{accelerator.num_processes} processes but batch_size {cfg.batch_size}: each process needs at "
                             f"least one row of every step; launch with --num_processes <= {cfg.batch_size} or raise batch_size.")
    key = cfg.key(data, f"{vlm.preset}@{weights_fingerprint(vlm.model)}")  # other weights or dtype: another run
    finished = finished_summary(out_dir, key)
    if finished is not None:
        return finished  # this exact run is complete and its files are intact

    torch.manual_seed(cfg.seed)
    model, params, reference = wrap_model(vlm, cfg)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / cfg.steps))
    plan, images = schedule(cfg, data), ImageCache(vlm)
    ckpt = out_dir / "checkpoint"
    resumed = load_checkpoint(ckpt, model, opt, sched, key)
    start, log, stopped = resumed if resumed else (0, [], None)
    t_prev = time.time()
    model.train()
    try:
        bar = tqdm(total=cfg.steps, initial=start, desc=desc or cfg.method, disable=not progress_enabled())
        for step in range(start, cfg.steps):
            if stopped:
                break
            rows = shard(step_rows(vlm, method, data, plan[step], images), accelerator.process_index, accelerator.num_processes)
            loss, logged = step_loss(model, reference, method, cfg, vlm, rows)
            accelerator.backward(loss)
            if accelerator.num_processes > 1:
                for p in params:
                    p.grad = accelerator.reduce(p.grad if p.grad is not None else torch.zeros_like(p), reduction="mean")
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            now = time.time()
            log.append({"step": step + 1, **{k: round(v, 6) for k, v in logged.items()}, "lr": sched.get_last_lr()[0],
                        "seconds": round(now - t_prev, 3)})
            t_prev = now
            if method.objective in ("ga", "npo") and logged["forget_nll"] > cfg.max_forget_nll:
                stopped = f"forget NLL {logged['forget_nll']:.1f} > max_forget_nll {cfg.max_forget_nll:g} at step {step + 1}"
            bar.update(1)
            if accelerator.is_main_process and ((step + 1) % cfg.checkpoint_every == 0 or stopped):
                save_checkpoint(ckpt, model, opt, sched, step + 1, log, key, stopped)
            if on_step is not None:
                on_step(step + 1)
    except BaseException:
        if cfg.lora:  # take the LoRA layers out again: the caller's model stays the base model
            vlm.model = model.unload()
        raise
    finally:
        bar.close()
    model.eval()
    summary = {"method": cfg.method, "key": key, "preset": vlm.preset, "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
               "steps_done": len(log), "stopped_by": stopped or f"step limit {cfg.steps}",
               "train_seconds": round(sum(r["seconds"] for r in log), 2),
               "rows_per_step": {k: len(v) for k, v in step_rows(vlm, method, data, plan[0], images).items()},
               "image_rows_per_step": len(plan[0]["forget"]) * (2 if method.objective == "ga" else 1) if method.images else 0}
    if accelerator.is_main_process:
        with atomic_dir(out_dir / "result") as tmp:
            if cfg.lora:
                save_adapter(model, tmp / "adapter", dtype=torch.float32)
            else:
                from safetensors.torch import save_file

                save_file(_trainable_state(model.trained), str(tmp / "llm.safetensors"))
            write_csv(pd.DataFrame(log), tmp / "losses.csv")
            summary["files"] = file_hashes(tmp)  # checked before anything trusts them (resume, stages 03-05)
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
        shutil.rmtree(ckpt, ignore_errors=True)
    vlm.model = model.unload() if cfg.lora else vlm.model  # the base model again, for the next method
    return summary


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


@contextlib.contextmanager
def adapter_applied(vlm, method_dir):
    """Within the block, `vlm.model` carries a method's saved LoRA adapter (unmerged); afterwards the base
    model is restored exactly (peft's unload), so one loaded model serves every method."""
    if hasattr(vlm.model, "peft_config"):  # unload would also strip that adapter, and the two would stack meanwhile
        raise TuError("adapter_applied needs the bare model, but vlm.model already carries a peft adapter: "
                      "unload it first (vlm.model = vlm.model.unload()).")
    peft_model = apply_adapter(vlm.base_model, Path(method_dir) / "adapter").eval()
    vlm.model = peft_model
    try:
        yield vlm
    finally:
        vlm.model = peft_model.unload()


# ---------------------------------------------------------------------------------------------
# quick check and figure


def check_asr(vlm, data_dir, n: int, max_new_tokens: int = 32) -> dict:
    """Keyword ASR on the first n held-out T1 (AdvBench text) and V1 (FigStep images) items: a quick
    before/after signal only; notebook 03 is the evaluation."""
    from . import judges, stats
    from .generate import generate
    from .render import FIGSTEP_TEXT_PROMPT

    t1 = read_jsonl(stage01_file(data_dir, "t1_advbench"))[:n]
    v1 = read_jsonl(stage01_file(data_dir, "v1_figstep"))[:n]
    texts = [vlm.chat(r["prompt"], False) for r in t1] + [vlm.chat(FIGSTEP_TEXT_PROMPT, True) for _ in v1]
    images = [None] * len(t1) + [vlm.render(r["image_text"], "figstep") for r in v1]
    answers = generate(vlm.model, vlm.processor, texts, images, max_new_tokens=max_new_tokens, desc="check")
    refused = judges.RefusalKeywordJudge().judge(answers)
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

    from .plots import theme

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
    from .params import resolve_path

    summaries = {}
    for name in P["methods"]:
        summaries[name] = train(vlm, data, TrainConfig.from_params(P, name), resolve_path(P["out_dir"]) / name)
        if after is not None:
            after(name, summaries[name])
    return summaries


def check_table(checks: dict, summaries: dict) -> pd.DataFrame:
    """Quick-check rows: per model, keyword ASR on the T1 and V1 slices (n and 95% CI), steps and stop reason."""
    from .stats import fmt_rate

    rows = []
    for name, c in checks.items():
        s = summaries.get(name, {})
        rows.append({"model": name, "steps": s.get("steps_done", 0), "stopped_by": s.get("stopped_by", "-"),
                     "T1 AdvBench ASR": fmt_rate(c["t1_advbench"]), "V1 FigStep ASR": fmt_rate(c["v1_figstep"])})
    return pd.DataFrame(rows)


def write_record(P: dict, data: UnlearnData, summaries: dict, checks: dict, started: float) -> Path:
    """run_record.json and check.json in out_dir (the adapters are already in out_dir/<method>/)."""
    from .params import resolve_path

    out = claim_output_dir(resolve_path(P["out_dir"]), NOTEBOOK)
    write_json(out / "check.json", {k: {s: v[s] for s in ("t1_advbench", "v1_figstep")} for k, v in checks.items()})
    write_json(out / "run_record.json", run_record(
        P, data.inputs, started, seeds={"schedule": P["seed"]},
        methods={m: {k: s[k] for k in ("steps_done", "stopped_by", "train_seconds")} for m, s in summaries.items()}))
    return out


def main(argv: list[str]) -> None:
    """`python -m tu_lib.unlearn name=value ...` (or under `accelerate launch`): notebook 02's training without
    the notebook, e.g. `accelerate launch --num_processes 2 -m tu_lib.unlearn profile=paper` (at most batch_size processes)."""
    import yaml

    from . import models

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
