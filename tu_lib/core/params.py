"""Notebook parameters: typed specs, profiles and validation.

papermill injects whatever `-p name value` it is given, with a guessed type, and never complains.
So each notebook's second cell hands its globals to `resolve`, which rejects unknown names, wrong
types and out-of-range values before any heavy work, and fills unset (None) values from the chosen
profile in configs/<profile>/<notebook>.yaml — the same files `papermill -f` takes.
"""
from __future__ import annotations

import difflib
import math
import os
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from .errors import ParameterError
from .files import check_output_dir
from .paths import repo_root

_IPYTHON_NAMES = {"In", "Out", "get_ipython", "exit", "quit", "open"}


@dataclass(frozen=True)
class Param:
    """One notebook parameter: its type(s), default, meaning, and an optional range check."""

    name: str
    types: tuple
    default: Any
    help: str
    check: Callable[[Any], str | None] | None = None  # returns an error text, or None when fine
    profiled: bool = False  # None means "take the profile's value"
    folder: bool = False  # a user's local folder: must exist; relative paths start at the repository root
    # "output": a folder the stage writes (checked to be its own, see core.output_dir_problem); "figures": the
    # figure folder (follows an explicit output folder); "path": any other path (another stage's output)
    kind: str = ""


@dataclass
class Spec:
    notebook: str
    params: list[Param] = field(default_factory=list)

    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def get(self, name: str) -> Param:
        return next(p for p in self.params if p.name == name)


# ---- reusable checks -------------------------------------------------------------------------


def non_negative(v):
    return None if v >= 0 else "must be ≥ 0"


def positive(v):
    return None if v > 0 else "must be > 0"


def _size_check(smallest: int, words: str):
    def check(v):
        ok = v == "all" if isinstance(v, str) else v >= smallest
        return None if ok else f"must be a {words} integer or 'all'"
    return check


size_value = _size_check(0, "non-negative")    # a set size (0 drops the set)
positive_size = _size_check(1, "positive")     # a sample size that must not be empty


SEED_MAX = 2**32 - 1  # numpy's legacy generators take at most this; torch.manual_seed fails above 2**64 - 1


def seed_value(v):
    """Every notebook's seed: numpy, torch and Python's random all accept it, so a run never fails late."""
    return None if 0 <= v <= SEED_MAX else f"must be an integer from 0 to {SEED_MAX} (2**32 - 1)"


def fraction(v):
    return None if 0.0 <= v <= 1.0 else "must be between 0 and 1"


def one_of(*choices):
    def check(v):
        return None if v in choices else f"must be one of {', '.join(map(repr, choices))}"
    return check


dtype_value = one_of("auto", "float32", "bfloat16")  # every notebook's model dtype


# ---- profiles -----------------------------------------------------------------------------------


def configs_dir() -> Path:
    return repo_root() / "configs"


def available_profiles() -> list[str]:
    return sorted(p.name for p in configs_dir().iterdir() if p.is_dir())


def profile_values(profile: str, notebook: str) -> dict:
    if profile not in available_profiles():
        raise ParameterError(
            f"Unknown profile {profile!r}. Choose one of {available_profiles()} "
            f"(e.g. `-p profile smoke`); each is a folder under configs/."
        )
    path = configs_dir() / profile / f"{notebook}.yaml"
    if not path.is_file():
        return {"profile": profile}
    values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(values, dict):
        raise ParameterError(f"{path} must hold a mapping of parameter names to values.")
    return values


# ---- validation -----------------------------------------------------------------------------------


def user_variables(namespace: dict) -> dict:
    """The plain values a notebook's parameters cell (and papermill's injected cell) defined."""
    return {
        k: v
        for k, v in namespace.items()
        if not k.startswith("_")
        and k not in _IPYTHON_NAMES
        and not isinstance(v, (types.ModuleType, type))
        and not callable(v)
    }


def _type_name(t) -> str:
    return "None" if t is type(None) else t.__name__


def _check_type(p: Param, value):
    if value is None and (p.profiled or type(None) in p.types):
        return value
    if isinstance(value, bool) and bool not in p.types:
        raise ParameterError(f"Parameter {p.name}={value!r} is a bool; it must be {' or '.join(map(_type_name, p.types))}.")
    if isinstance(value, int) and not isinstance(value, bool) and float in p.types and int not in p.types:
        return float(value)
    if isinstance(value, tuple) and list in p.types:
        value = list(value)
    if not isinstance(value, p.types):
        want = " or ".join(_type_name(t) for t in p.types)
        raise ParameterError(
            f"Parameter {p.name}={value!r} has type {type(value).__name__}; it must be {want}. "
            f"Pass e.g. `-p {p.name} {p.default!r}`. Meaning: {p.help}"
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise ParameterError(f"Parameter {p.name}={value!r} must be a finite number. Meaning: {p.help}")
    if isinstance(value, int) and not isinstance(value, bool) and not INT_MIN <= value <= INT_MAX:
        raise ParameterError(f"Parameter {p.name}={value!r} is out of range: integers must fit in 64 bits. "
                             f"Meaning: {p.help}")
    return value


INT_MIN, INT_MAX = -(2**63), 2**63 - 1
PATH_HEADROOM = 200  # characters a stage appends below its folders (subfolders, file names, scratch suffixes)
NAME_HEADROOM = 32   # characters a scratch copy adds to a folder's name (".<name>.tmp-XXXXXXXX")


def path_problem(value: str, headroom: bool = True) -> str | None:
    """Why a path cannot be created here (NUL byte, a name or the whole path longer than the file system takes,
    leaving room for what the stage appends), before a stage fails at write time with a raw OSError."""
    if "\0" in value:
        return "contains a NUL byte"
    path = resolve_path(value)
    probe = next((a for a in (path, *path.parents) if _exists(a)), Path("/"))
    try:
        name_max, path_max = os.pathconf(probe, "PC_NAME_MAX"), os.pathconf(probe, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    extra_name, extra_path = (NAME_HEADROOM, PATH_HEADROOM) if headroom else (0, 0)
    longest = max(path.parts, key=lambda part: len(os.fsencode(part)))
    if len(os.fsencode(longest)) > name_max - extra_name:
        return (f"has a folder or file name of {len(os.fsencode(longest))} bytes; this file system takes "
                f"{name_max}" + (f" and the stage needs {extra_name} for scratch copies" if headroom else ""))
    if len(os.fsencode(str(path))) > path_max - extra_path:
        return (f"is {len(os.fsencode(str(path)))} bytes long; this file system takes {path_max}"
                + (f" and the stage appends up to {extra_path}" if headroom else ""))
    return None


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a name too long to even look up
        return False


def figure_dir_problem(value: str) -> str | None:
    """Why figures must not go to this folder: a file, the clone itself, or one of its source or data folders
    (figures/ and runs/ are fine: a stage only writes its own <stage>_*.png and .csv there)."""
    path = Path(os.path.abspath(resolve_path(value)))
    root = Path(os.path.abspath(repo_root()))
    if path.exists() and not path.is_dir():
        return "is a file, not a folder"
    if path == root or path in root.parents:
        return "is the repository itself or a folder that holds it"
    if root in path.parents:
        top = path.relative_to(root).parts[0]
        if top not in ("figures", "runs"):
            return f"lies in the repository's {top}/ folder (figures go to figures/ or under runs/)"
    return None


def resolve(spec: Spec, namespace: dict) -> dict:
    """Validate a notebook's parameters and fill profile values; raises ParameterError on any problem."""
    given = user_variables(namespace)
    unknown = sorted(set(given) - set(spec.names()))
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, spec.names(), n=1)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ParameterError(
            f"Unknown parameter(s) for {spec.notebook}: {', '.join(hints)}. "
            f"Valid parameters: {', '.join(spec.names())}."
        )
    values = {p.name: given.get(p.name, p.default) for p in spec.params}
    profile = values.get("profile", "default")
    if not isinstance(profile, str):
        raise ParameterError(f"Parameter profile={profile!r} must be a string naming a folder under configs/.")
    from_profile = profile_values(profile, spec.notebook)
    stray = sorted(set(from_profile) - set(spec.names()))
    if stray:
        raise ParameterError(f"configs/{profile}/{spec.notebook}.yaml names unknown parameter(s) {stray}.")
    resolved = {}
    for p in spec.params:
        value = values[p.name]
        if value is None and p.profiled:
            value = _followed_output(spec, values, from_profile, p) or from_profile.get(p.name, p.default)
        value = _check_type(p, value)
        if value is None and p.profiled:
            raise ParameterError(f"Parameter {p.name} is unset and profile {profile!r} gives no value for it.")
        if p.check is not None and value is not None:
            problem = p.check(value)
            if problem:
                raise ParameterError(f"Parameter {p.name}={value!r} {problem}. Meaning: {p.help}")
        if (p.folder or p.kind) and value:
            problem = path_problem(value, headroom=p.kind in ("output", "figures"))
            if problem:
                raise ParameterError(f"Parameter {p.name}={value!r} {problem}: pass a shorter path. Meaning: {p.help}")
        if p.folder and value:
            folder = resolve_path(value)
            if not folder.is_dir():
                raise ParameterError(f"Parameter {p.name}={value!r}: no folder at {folder} (relative paths start at the "
                                     f"repository root, as papermill may run the notebook elsewhere). Meaning: {p.help}")
            value = str(folder)
        if p.kind == "output" and value:
            check_output_dir(resolve_path(value), spec.notebook, p.name, shown=value)
        if p.kind == "figures" and value:
            problem = figure_dir_problem(value)
            if problem:
                raise ParameterError(f"Parameter {p.name}={value!r} {problem}. Pass another folder, e.g. "
                                     f"`-p {p.name} runs/my_figures`. Meaning: {p.help}")
        resolved[p.name] = value
    return resolved


def _followed_output(spec: Spec, values: dict, from_profile: dict, p: Param) -> str | None:
    """An unset figure folder follows an output folder the user chose: <out_dir>/figures. So a run with its own
    out_dir never overwrites the profile's figures (those of another run)."""
    if p.kind != "figures":
        return None
    chosen = [values[q.name] for q in spec.params if q.kind == "output"
              and values[q.name] not in (None, q.default, from_profile.get(q.name))]
    return f"{chosen[0].rstrip('/')}/figures" if chosen else None


def describe(spec: Spec) -> str:
    """A table of the spec (name, type, default, meaning) — printed by notebooks and the README."""
    rows = [f"{p.name:<24} {'|'.join(_type_name(t) for t in p.types):<12} {p.default!r:<16} {p.help}" for p in spec.params]
    return "\n".join(rows)


def resolve_path(value: str) -> Path:
    """Relative paths are taken from the repository root, so papermill's working directory
    (the notebook's folder) does not change where outputs go."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else repo_root() / path


def portable_path(path) -> str:
    """`path` as written into committed outputs: relative to the repository root when it lies inside it (so a file
    does not name the machine it was made on; resolve_path reads it back), else absolute."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(repo_root().resolve()))
    except ValueError:
        return str(path)
