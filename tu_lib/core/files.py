"""Files that cross a stage boundary: hashing, vendored-data checks, output folders a stage may own, atomic writes.

Stages meet only through files, so every file that crosses a stage boundary is hashed, and every
output folder is written atomically (a failed run leaves nothing half-written behind).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from .errors import DataFileError, ParameterError, TuError
from .paths import REPO_ROOT, data_dir

# ---------------------------------------------------------------------------------------------
# hashing


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_checksums(folder: Path) -> dict[str, str]:
    """Parse <folder>/SHA256SUMS (the `sha256sum` format, so `sha256sum -c` checks it too)."""
    sums = folder / "SHA256SUMS"
    if not sums.is_file():
        raise DataFileError(
            f"{sums} is missing. It lists the SHA-256 of every vendored data file; restore it with "
            f"`git checkout -- data/SHA256SUMS` (or point data_dir / $TU_DATA_DIR at a complete copy of data/)."
        )
    out: dict[str, str] = {}
    for line in sums.read_text(encoding="utf-8").splitlines():
        if line.strip():
            digest, rel = line.split(maxsplit=1)
            out[rel.strip().lstrip("*")] = digest
    return out


def verified_path(rel: str, folder: str | os.PathLike | None = None) -> Path:
    """Return data/<rel> after checking that it exists and matches its recorded SHA-256."""
    root = data_dir(folder)
    expected = read_checksums(root).get(rel)
    path = root / rel
    if expected is None:
        raise DataFileError(f"{rel} is not listed in {root / 'SHA256SUMS'}; only vendored files can be loaded by name.")
    if not path.is_file():
        raise DataFileError(
            f"Data file {path} is missing. Restore it with `git checkout -- data/{rel}` "
            f"(or point data_dir / $TU_DATA_DIR at a complete copy of data/)."
        )
    actual = sha256_file(path)
    if actual != expected:
        raise DataFileError(
            f"Data file {path} does not match its recorded SHA-256 (expected {expected[:12]}…, found {actual[:12]}…): "
            f"it was edited or corrupted. Restore the published file with `git checkout -- data/{rel}`; "
            f"data/SOURCES.md says where it comes from."
        )
    return path


def file_hashes(folder: str | os.PathLike, names: Iterable[str] | None = None) -> dict[str, str]:
    """relative path -> SHA-256 of the named files under `folder` (every file, output markers aside, when
    `names` is None): recorded when a cache or an adapter is written, so a later reader can tell damage."""
    folder = Path(folder)
    if names is None:
        names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != OUTPUT_MARKER)
    return {name: sha256_file(folder / name) for name in names}


def damaged_files(folder: str | os.PathLike, recorded: dict[str, str]) -> list[str]:
    """The files of `recorded` (relative path -> SHA-256) that are missing under `folder` or whose content changed."""
    folder = Path(folder)
    return [name for name, digest in recorded.items()
            if not (folder / name).is_file() or sha256_file(folder / name) != digest]


def record_hash(path: str | os.PathLike) -> None:
    """Write <path>.sha256 (the `sha256sum` format) beside a cache file, to be checked by hash_problem."""
    path = Path(path)
    with atomic_path(path.with_name(path.name + ".sha256")) as tmp:
        tmp.write_text(f"{sha256_file(path)}  {path.name}\n", encoding="utf-8")


def hash_problem(path: str | os.PathLike) -> str | None:
    """None when `path` matches the SHA-256 recorded beside it (record_hash); else what is wrong with it."""
    path, sums = Path(path), Path(str(path) + ".sha256")
    if not path.is_file():
        return "is missing"
    try:
        recorded = sums.read_text(encoding="utf-8").split()[0]
    except (OSError, IndexError, UnicodeDecodeError):
        return "has no readable SHA-256 recorded beside it"
    return None if sha256_file(path) == recorded else "does not match the SHA-256 recorded when it was written"


def verify_all(rels: Iterable[str], folder: str | os.PathLike | None = None) -> dict[str, str]:
    """Check several vendored files at once (before heavy work); returns rel -> sha256."""
    sums = read_checksums(data_dir(folder))
    return {rel: (verified_path(rel, folder), sums[rel])[1] for rel in rels}


# ---------------------------------------------------------------------------------------------
# outputs


OUTPUT_MARKER = ".tu-output.json"  # marks a folder as one stage's output: only that stage may write or replace it

# the clone's own folders: never an output folder, whatever they hold (outputs go under runs/ by default)
_REPOSITORY_FOLDERS = ("data", "organism", "tu_lib", "notebooks", "configs", "tests", "docs", "scripts", "benchmarks",
                       "figures", ".git", ".ci", ".venv")


def output_owner(folder: str | os.PathLike) -> str | None:
    """The stage named by `folder`'s output marker, or None when it has no (readable) marker."""
    try:
        marker = json.loads((Path(folder) / OUTPUT_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker.get("stage") if isinstance(marker, dict) and isinstance(marker.get("stage"), str) else None


def output_dir_problem(folder: str | os.PathLike, stage: str) -> str | None:
    """Why `stage` must not write into (and perhaps replace) `folder`; None when it may.

    A stage may write only into a folder that does not exist yet, an empty one, or one whose marker names this
    stage: so a mistyped out_dir can never delete a user's files, the clone or its vendored data. It may not
    lie inside another stage's output folder either, which that stage replaces whole when it reruns. The clone's
    own folders are refused even when empty or marked, except organism/ for stage 00's rebuild."""
    path = Path(os.path.abspath(Path(folder).expanduser()))
    root = Path(os.path.abspath(REPO_ROOT))
    if path == root or path in root.parents:
        return "is the repository itself or a folder that holds it"
    for name in _REPOSITORY_FOLDERS:
        if path == root / name and not (name == "organism" and stage == "00_organism"):
            return f"is the repository's own {name}/ folder"
    if path.exists() and not path.is_dir():
        return "is a file, not a folder"
    if path.is_dir():
        owner = output_owner(path)
        if owner is None and any(path.iterdir()):
            return (f"already holds files, and no {OUTPUT_MARKER} marks it as a tu output folder (if it is the output "
                    "of an earlier tu version, delete it yourself)")
        if owner is not None and owner != stage:
            return f"is the output folder of stage {owner}"
    for parent in path.parents:
        owner = output_owner(parent)
        if owner is not None:
            return f"lies inside {parent}, the output folder of stage {owner}, which that stage replaces when it reruns"
    return None


def check_output_dir(folder: str | os.PathLike, stage: str, name: str = "out_dir", shown: str | None = None) -> Path:
    """Refuse, before any work, an output folder that `stage` must not write into (see output_dir_problem);
    `shown` is the value as the user gave it, for the message."""
    problem = output_dir_problem(folder, stage)
    if problem:
        given = shown if shown is not None else str(folder)
        raise ParameterError(f"{name}={given!r} {problem}: stage {stage} writes only into a new folder, an empty "
                             f"one or its own earlier output (marked by {OUTPUT_MARKER}). Pass another {name}, e.g. "
                             f"`-p {name} runs/my_{stage}`.")
    return Path(folder)


def claim_output_dir(folder: str | os.PathLike, stage: str, name: str = "out_dir") -> Path:
    """Check `folder` (check_output_dir), create it and mark it as `stage`'s output; returns it."""
    folder = check_output_dir(folder, stage, name)
    folder.mkdir(parents=True, exist_ok=True)
    if output_owner(folder) != stage:
        _mark(folder, stage)
    return folder


def _mark(folder: Path, stage: str) -> None:
    write_json(folder / OUTPUT_MARKER, {"stage": stage, "written_by": "tu"})


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, stage: str | None = None) -> Iterator[Path]:
    """Yield a scratch folder next to `final`; on success it replaces `final`, on error it is removed.

    So an interrupted or failing stage never leaves a half-written output folder behind. With `stage`, `final`
    must be that stage's to replace (check_output_dir: never a user's folder) and the result carries its marker."""
    final = Path(final)
    if stage is not None:
        check_output_dir(final, stage)
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield scratch
        if stage is not None:
            check_output_dir(final, stage)  # still ours after the work (nothing else wrote there meanwhile)
            _mark(scratch, stage)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    backup = None
    if final.exists():
        backup = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(backup)
    scratch.rename(final)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a scratch path next to `final`; on success it replaces `final`, on error it is removed. Later
    stages trust a file because it exists, so an interrupted write must never leave a truncated one."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    scratch = Path(name)
    try:
        yield scratch
        with open(scratch, "rb+") as f:  # on disk before the rename, so a crash cannot leave an empty file
            os.fsync(f.fileno())
        os.replace(scratch, final)
    finally:
        if scratch.exists():
            scratch.unlink()


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
            n += 1
    return n


def write_csv(table, path: str | os.PathLike) -> None:
    """A pandas table as CSV, written atomically, with the same line ends on every platform."""
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False, lineterminator="\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Rows of a JSONL file; a line that is not a JSON object stops with the file, the line and what to do."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TuError(f"{path} line {n} is not valid JSON ({e.msg}): the file is damaged. Re-run the stage "
                              "that wrote it (a cache file can simply be deleted).") from e
            if not isinstance(row, dict):
                raise TuError(f"{path} line {n} is not a JSON object: the file is damaged or not ours. Re-run the "
                              "stage that wrote it (a cache file can simply be deleted).")
            rows.append(row)
    return rows
