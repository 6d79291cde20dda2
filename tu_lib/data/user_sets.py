"""Attack sets users bring: a CSV or JSONL file of prompts, read and checked before any model loads.

Columns (CSV header or JSONL keys; case and surrounding spaces do not matter):

* `prompt` (required column): the text prompt. It may be empty in a row with an image, which then gets FigStep's
  benign text prompt (as the built-in V1 set does);
* `image` (optional): an image file, relative to the set file's folder (or absolute);
* `image_text` (optional): a text shown as a typographic image in the model's own typography (like V1);
  a row has `image` or `image_text` or neither, never both;
* `request` (optional): what the judges compare the answer with (default: `image_text`, else the prompt);
* `category` (optional): a label of your own, kept with each judgement;
* `id` (optional): unique in the file; rows without one are numbered by their position (1, 2, ...).

Every problem stops with the file, the line or column, and what to do; images are opened and decoded here.
"""
from __future__ import annotations

import csv
import difflib
import json
from pathlib import Path

import yaml

from ..core.errors import ParameterError, TuError
from ..core.files import sha256_file, sha256_text
from ..core.params import path_problem, resolve_path
from ..core.text import as_list
from .sets import eval_sets

SUFFIXES = (".csv", ".jsonl")
COLUMNS = ("prompt", "image", "image_text", "request", "category", "id")
FORMAT_HINT = ("a CSV file with a header line (`prompt` and optionally image, image_text, request, category, id) "
               "or a JSONL file with one JSON object per line (the same keys); see the README's 'Your own attack sets'")


# ---------------------------------------------------------------------------------------------
# the parameter: a list of files


def user_set_paths(value) -> list[str]:
    """The `user_sets` parameter as absolute file paths: a list, a JSON/YAML list (`'["a.csv", "b.jsonl"]'`, what
    papermill's -p passes as a string) or a comma-separated string. Relative paths start at the repository root.
    Checks the names only (extension, length, set names that would clash); `read_user_set` checks the contents."""
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ParameterError(f"Parameter user_sets={value!r} is not a readable list ({e.problem}); pass e.g. "
                                 "`-p user_sets '[\"my/prompts.csv\"]'` or `-p user_sets my/prompts.csv,other.jsonl`.") from None
    items = as_list(value) if isinstance(value, (str, list, tuple)) else None
    if items is None or not all(isinstance(p, str) and p.strip() for p in items):
        raise ParameterError(f"Parameter user_sets={value!r} must be a list of file paths (non-empty strings), e.g. "
                             "`-p user_sets '[\"my/prompts.csv\"]'`.")
    paths = []
    for p in (p.strip() for p in items):
        if Path(p).suffix.lower() not in SUFFIXES:
            raise ParameterError(f"user set {p!r} has the extension {Path(p).suffix or '(none)'!r}; a user set is "
                                 f"{FORMAT_HINT}. Name the file *.csv or *.jsonl.")
        problem = path_problem(p, headroom=False)
        if problem:
            raise ParameterError(f"user set {p!r} {problem}: pass a shorter path.")
        paths.append(str(resolve_path(p)))
    eval_sets(paths)  # two files that would be the same set are refused here
    return paths


# ---------------------------------------------------------------------------------------------
# the file


def read_user_set(path: str | Path) -> list[dict]:
    """Every row of a user set, checked: {"id", "line", "prompt", "image" (absolute path or None), "image_sha256",
    "image_text", "request", "category", "digest" (of what the model is shown)}. Raises TuError naming the file,
    the line or column and the fix."""
    path = Path(path)
    if not path.is_file():
        raise TuError(f"user set {path}: no such file. Relative paths start at the repository root; pass an existing "
                      f"*.csv or *.jsonl file (or drop it from user_sets).")
    if path.suffix.lower() not in SUFFIXES:
        raise TuError(f"user set {path}: unknown extension {path.suffix!r}; a user set is {FORMAT_HINT}.")
    text = _text(path)
    if not text.strip():
        raise TuError(f"user set {path} is empty: a user set is {FORMAT_HINT}, with at least one row.")
    records = _csv_records(path, text) if path.suffix.lower() == ".csv" else _jsonl_records(path, text)
    if not records:
        raise TuError(f"user set {path} has a header but no rows: add at least one prompt.")
    rows, seen, hashes = [], {}, {}
    for position, (line, record) in enumerate(records, 1):
        rows.append(_row(path, line, position, record, seen, hashes))
    return rows


def user_set_files(path: str | Path, rows: list[dict]) -> list[Path]:
    """The files a user set reads: the set file and each image once (for the run record's input hashes)."""
    return [Path(path), *dict.fromkeys(Path(r["image"]) for r in rows if r["image"])]


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # a byte-order mark (spreadsheet exports) is dropped
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise TuError(f"user set {path} line {line} is not UTF-8 text: save the file as UTF-8 (CSV UTF-8 in a "
                      "spreadsheet).") from None
    except OSError as e:
        raise TuError(f"user set {path} cannot be read ({e.strerror}): check its permissions.") from None


def _columns(path: Path, names: list[str], where: str, word: str = "column") -> None:
    """`prompt` among the column names (a CSV's header, a JSONL line's keys), none twice, all known."""
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise TuError(f"user set {path} {where} names the {word}(s) {twice} more than once: keep one of each.")
    if "prompt" not in names:
        raise TuError(f"user set {path} {where} has no `prompt` {word} ({word}s: {', '.join(names) or 'none'}); "
                      f"every row needs one: name the {word} that holds the text prompt `prompt`.")
    unknown = [n for n in names if n not in COLUMNS]
    if unknown:
        hints = [f"{n!r}" + (f" (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(n, COLUMNS, 1)) else "")
                 for n in unknown]
        raise TuError(f"user set {path} {where} has unknown {word}(s) {', '.join(hints)}; the {word}s are "
                      f"{', '.join(COLUMNS)}. Rename or remove them.")


def _csv_records(path: Path, text: str) -> list[tuple[int, dict]]:
    reader = csv.reader(text.splitlines(keepends=True))
    try:
        header = [h.strip().lower() for h in next(reader)]
        _columns(path, header, "(header, line 1)")
        records = []
        for fields in reader:
            if not any(f.strip() for f in fields):
                continue  # a blank line
            if len(fields) > len(header):
                raise TuError(f"user set {path} line {reader.line_num} has {len(fields)} fields, the header "
                              f"{len(header)}: quote fields that hold commas (\"like, this\").")
            records.append((reader.line_num, dict(zip(header, fields + [""] * (len(header) - len(fields))))))
    except csv.Error as e:
        raise TuError(f"user set {path} line {reader.line_num} is not valid CSV ({e}): check its quotes.") from None
    return records


def _jsonl_records(path: Path, text: str) -> list[tuple[int, dict]]:
    records = []
    for line, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise TuError(f"user set {path} line {line} is not valid JSON ({e.msg}, column {e.colno}): each line "
                          "must be one JSON object, e.g. {\"prompt\": \"...\"}.") from None
        if not isinstance(obj, dict):
            raise TuError(f"user set {path} line {line} is a JSON {type(obj).__name__}, not an object: write each "
                          "row as {\"prompt\": \"...\", ...}.")
        record = {str(k).strip().lower(): v for k, v in obj.items()}
        _columns(path, [str(k).strip().lower() for k in obj], f"line {line}", "key")
        for key, v in record.items():
            if v is None:
                record[key] = ""
            elif key == "id" and isinstance(v, int) and not isinstance(v, bool):
                record[key] = str(v)
            elif not isinstance(v, str):
                raise TuError(f"user set {path} line {line}: `{key}` is a JSON {type(v).__name__}; it must be a "
                              "string" + (" or an integer" if key == "id" else "") + ".")
        records.append((line, record))
    return records


def _row(path: Path, line: int, position: int, record: dict, seen: dict, hashes: dict) -> dict:
    where = f"user set {path} line {line}"
    value = {k: (record.get(k) or "").strip() for k in COLUMNS}
    if value["image"] and value["image_text"]:
        raise TuError(f"{where} has both `image` and `image_text`: a row shows one image, a file or a rendered "
                      "text; leave one of them empty.")
    if not value["prompt"] and not (value["image"] or value["image_text"]):
        raise TuError(f"{where} has an empty prompt and no image: give the row a prompt (or remove the row).")
    row_id = value["id"] or str(position)
    if row_id in seen:
        raise TuError(f"{where}: id {row_id!r} is already used on line {seen[row_id]} (rows without an id are "
                      "numbered by their position, 1, 2, ...): ids must be unique in the file.")
    seen[row_id] = line
    image = _checked_image(where, path.parent, value["image"], hashes) if value["image"] else None
    shown = json.dumps([value["prompt"], value["image_text"], hashes.get(image)], ensure_ascii=False)
    return {"id": row_id, "line": line, "prompt": value["prompt"], "image": image, "image_sha256": hashes.get(image),
            "image_text": value["image_text"] or None, "request": value["request"] or None,
            "category": value["category"] or None, "digest": sha256_text(shown)[:12]}


def _checked_image(where: str, folder: Path, value: str, hashes: dict) -> str:
    """The image's absolute path, after PIL has verified and decoded it (its SHA-256 goes into `hashes`)."""
    from PIL import Image

    path = Path(value).expanduser()
    path = path if path.is_absolute() else folder / path
    if not path.is_file():
        raise TuError(f"{where}: image {value!r} not found at {path} (image paths are relative to the set file's "
                      "folder): fix the path or copy the image there.")
    if str(path) not in hashes:
        try:
            with Image.open(path) as im:
                im.verify()
            with Image.open(path) as im:
                im.load()
        except Exception as e:  # PIL raises several kinds (UnidentifiedImageError, OSError, SyntaxError, ...)
            raise TuError(f"{where}: image {value!r} ({path}) cannot be read as an image ({type(e).__name__}: {e}); "
                          "replace it with a readable PNG or JPEG, or fix the path.") from None
        hashes[str(path)] = sha256_file(path)
    return str(path)
