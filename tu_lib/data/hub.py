"""Hub-only datasets (PKU-SafeRLHF, JailBreakV-28K, HADES, and the VLGuard / MM-SafetyBench images), read from a
local copy in the hub's layout or downloaded at a pinned revision; offline, HubDataUnavailable says what
to download and where to point the loader. Nothing here prints rows: the text is harmful by design.
"""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import pandas as pd

from ..core.errors import HubDataUnavailable, TuError
from .local import MM_SAFETYBENCH_PROMPT_FIELD, _choose, _parse_csv, _read_jsonl_text

# ---------------------------------------------------------------------------------------------
# hub-only datasets

# PKU-SafeRLHF, pinned to the commit that last changed data/ ("Remove noisy data points",
# 2024-09-10), whose full id appears in huggingface.co's own tree URL for the repo. The only later
# commit seen on main, 9421ffafec3fa40a1f1a7d567b4d525079477ecb, just updates README.md, so the data
# files are the same. Its README defines configs default / alpaca-7b / alpaca2-7b / alpaca3-8b over
# data/{Alpaca-7B,Alpaca2-7B,Alpaca3-8B}/{train,test}.jsonl.
PKU_SAFERLHF_ID = "PKU-Alignment/PKU-SafeRLHF"
PKU_SAFERLHF_REVISION = "d79b19b2043c4b168d8d64c61ef4ba4ed1ffe2c0"
PKU_SAFERLHF_CONFIGS = {
    "default": ("Alpaca-7B", "Alpaca2-7B", "Alpaca3-8B"),
    "alpaca-7b": ("Alpaca-7B",), "alpaca2-7b": ("Alpaca2-7B",), "alpaca3-8b": ("Alpaca3-8B",),
}
PKU_SAFERLHF_REQUIRED = ("prompt", "response_0", "response_1", "is_response_0_safe", "is_response_1_safe",
                         "better_response_id", "safer_response_id")

# JailBreakV-28K: at this commit the dataset card's configs point at JailBreakV_28K/JailBreakV_28K.csv,
# JailBreakV_28K/mini_JailBreakV_28K.csv and JailBreakV_28K/RedTeam_2K.csv (HF commit page c9ca511,
# "Update README.md"). The column names were confirmed from public code that reads these CSVs; the
# CSV bytes at this commit were not opened here.
JAILBREAKV_ID = "JailbreakV-28K/JailBreakV-28k"
JAILBREAKV_REVISION = "c9ca511ab18bb8840a07ba730c1818394760fd9c"
JAILBREAKV_REQUIRED = ("id", "jailbreak_query", "redteam_query", "format", "policy", "image_path")

# HADES on the hub: data/test-0000{0,1}-of-00002.parquet with columns id, scenario, keywords, step,
# category, instruction, image (HF Image struct). Only the short id (b703e3b) of the upload commit
# was seen, so this is NOT pinned: pin it to the full 40-hex commit before relying on it.
HADES_ID = "Monosail/HADES"
HADES_REVISION = "main"
HADES_REQUIRED = ("id", "scenario", "keywords", "step", "category", "instruction")


@dataclass(frozen=True)
class _Hub:
    dataset: str
    repo_id: str
    revision: str
    env_var: str
    include: str

    def unavailable(self, why: str) -> HubDataUnavailable:
        return HubDataUnavailable(
            f"{self.dataset} is hub-only (hub id {self.repo_id}, revision {self.revision}) and is not available here: {why}\n"
            f"To provide it, on a machine with hub access run:\n"
            f"  hf download {self.repo_id} --repo-type dataset --revision {self.revision} --include '{self.include}' --local-dir <DIR>\n"
            f"then copy <DIR> here and pass local_dir=<DIR> or set {self.env_var}=<DIR>."
        )


_PKU_HUB = _Hub("PKU-SafeRLHF", PKU_SAFERLHF_ID, PKU_SAFERLHF_REVISION, "TU_PKU_SAFERLHF_DIR", "data/*")
_JBV_HUB = _Hub("JailBreakV-28K", JAILBREAKV_ID, JAILBREAKV_REVISION, "TU_JAILBREAKV_DIR", "JailBreakV_28K/*")
_HADES_HUB = _Hub("HADES", HADES_ID, HADES_REVISION, "TU_HADES_DIR", "data/*")


def hub_offline() -> bool:
    """True if the hub is switched off by environment (checked first so nothing ever waits on a network)."""
    return any(os.environ.get(v, "").strip().upper() in {"1", "ON", "YES", "TRUE"} for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _hub_root(hub: _Hub, local_dir, patterns: list[str]) -> Path:
    """Where the hub files live: local_dir, else $<env_var>, else a pinned snapshot download.

    The download goes through huggingface_hub (not datasets.load_dataset) so hub and local copies are
    parsed by the same code and give identical frames; offline or connection failures become
    HubDataUnavailable with the download instructions."""
    local = local_dir or os.environ.get(hub.env_var)
    if local:
        root = Path(local).expanduser()
        if not root.is_dir():
            raise hub.unavailable(f"local directory {root} does not exist.")
        return root
    if hub_offline():
        raise hub.unavailable(f"no local copy was given ({hub.env_var} is unset) and HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set.")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(hub.repo_id, repo_type="dataset", revision=hub.revision, allow_patterns=patterns))
    except Exception as e:  # connection, offline, gated, missing revision: all mean "not available here"
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise hub.unavailable(f"download failed ({type(e).__name__}: {first}).") from e


def _require(hub: _Hub, root: Path, rel: str) -> Path:
    path = root / rel
    if not path.is_file():
        raise hub.unavailable(f"{path} is missing (expected the hub layout {rel} under {root}).")
    return path


def _warn_revision(hub: _Hub, root: Path, rel: str) -> None:
    """`hf download --local-dir` records the commit of each file; warn if a local copy is of another
    revision than the pinned one (results would then not be comparable)."""
    meta = root / ".cache" / "huggingface" / "download" / f"{rel}.metadata"
    if re.fullmatch(r"[0-9a-f]{40}", hub.revision) and meta.is_file():
        commit = meta.read_text(encoding="utf-8").split("\n", 1)[0].strip()
        if commit and commit != hub.revision:
            warnings.warn(f"{hub.dataset}: local {rel} was downloaded at revision {commit}, not the pinned {hub.revision}.", stacklevel=3)


def load_pku_saferlhf(split: str = "train", revision: str = PKU_SAFERLHF_REVISION, local_dir=None, config: str = "default",
                      probe_only: bool = False) -> pd.DataFrame | Path:
    """PKU-SafeRLHF preference pairs with the published columns (prompt, response_0/1, their sources,
    is_response_k_safe, response_k_harm_category (dict of 19 bools), response_k_severity_level,
    better_response_id, safer_response_id, ...), rows in file order, config folders in README order.

    Reads data/<Folder>/<split>.jsonl from local_dir / $TU_PKU_SAFERLHF_DIR (an `hf download` of the
    repo) or downloads it at `revision`. probe_only=True only checks that the files are there (so a
    stage can fail fast before any work) and returns their root folder. llm_unlearn used split
    "330k_train" of an older layout of this repo, which the current layout does not have."""
    _choose(split, ("train", "test"), "PKU-SafeRLHF split", " ('330k_train' belongs to an older layout of the hub repo.)")
    _choose(config, tuple(PKU_SAFERLHF_CONFIGS), "PKU-SafeRLHF config")
    hub = _Hub(_PKU_HUB.dataset, _PKU_HUB.repo_id, revision, _PKU_HUB.env_var, _PKU_HUB.include)
    rels = [f"data/{folder}/{split}.jsonl" for folder in PKU_SAFERLHF_CONFIGS[config]]
    root = _hub_root(hub, local_dir, rels)
    if probe_only:
        for rel in rels:
            _require(hub, root, rel)
        return root
    rows: list[dict] = []
    for rel in rels:
        path = _require(hub, root, rel)
        _warn_revision(hub, root, rel)
        rows.extend(_read_jsonl_text(path.read_text(encoding="utf-8"), str(path)))
    df = pd.DataFrame(rows)
    missing = [c for c in PKU_SAFERLHF_REQUIRED if c not in df.columns]
    if missing:
        raise TuError(f"PKU-SafeRLHF files under {root} lack columns {missing}; is this the current hub layout?")
    return df


def pku_unsafe_pairs(df: pd.DataFrame) -> pd.DataFrame:
    """One (question, answer) row per unsafe response, as Yao et al.'s llm_unlearn builds its forget
    set: for each row in order, response_0 then response_1 when `is_response_k_safe == False`.

    Columns: question, answer, response_id (0/1), source_row (position in df)."""
    out = []
    for pos, (prompt, r0, r1, s0, s1) in enumerate(zip(df["prompt"], df["response_0"], df["response_1"],
                                                       df["is_response_0_safe"], df["is_response_1_safe"])):
        for k, (resp, safe) in enumerate(((r0, s0), (r1, s1))):
            if safe == False:  # noqa: E712  (explicit: only a published False counts)
                out.append({"question": prompt, "answer": resp, "response_id": k, "source_row": pos})
    return pd.DataFrame(out, columns=["question", "answer", "response_id", "source_row"])


JAILBREAKV_FILES = {False: "JailBreakV_28K/JailBreakV_28K.csv", True: "JailBreakV_28K/mini_JailBreakV_28K.csv"}


def _jbv_base(root: Path) -> Path:
    """Accept both the snapshot root and its JailBreakV_28K/ folder (image paths are relative to it)."""
    return root / "JailBreakV_28K" if (root / "JailBreakV_28K").is_dir() else root


def load_jailbreakv_28k(local_dir=None, mini: bool = False, revision: str = JAILBREAKV_REVISION) -> pd.DataFrame:
    """JailBreakV-28K (JailBreakV_28K.csv) or its 280-row mini split, published columns (id,
    jailbreak_query, redteam_query, format, policy, image_path, from, selected_mini,
    transfer_from_llm). `id` becomes int and True/False columns bool when every value allows it;
    everything else stays text ("" for empty). image_path is relative to the JailBreakV_28K/ folder
    that holds the CSV: use attach_images(df, "jailbreakv_28k", <dir>)."""
    hub = _Hub(_JBV_HUB.dataset, _JBV_HUB.repo_id, revision, _JBV_HUB.env_var, _JBV_HUB.include)
    rel = JAILBREAKV_FILES[bool(mini)]
    root = _hub_root(hub, local_dir, [rel])
    base = _jbv_base(root)
    path = base / Path(rel).name
    if not path.is_file():
        raise hub.unavailable(f"{path} is missing (expected the hub layout {rel}).")
    _warn_revision(hub, root, rel)
    header, rows, _ = _parse_csv(path.read_text(encoding="utf-8-sig"), str(path))
    df = pd.DataFrame(rows, columns=header)
    missing = [c for c in JAILBREAKV_REQUIRED if c not in df.columns]
    if missing:
        raise TuError(f"{path} lacks columns {missing}; is this the current JailBreakV-28K layout?")
    if df["id"].str.fullmatch(r"\d+").all():
        df["id"] = df["id"].astype(int)
    for col in ("selected_mini", "transfer_from_llm"):
        if col in df.columns and df[col].isin(["True", "False"]).all():
            df[col] = df[col] == "True"
    return df


def _hades_files(root: Path) -> list[Path]:
    return sorted((root / "data").glob("test-*.parquet"))


def load_hades(local_dir=None, step: int | None = None, revision: str = HADES_REVISION) -> pd.DataFrame:
    """HADES instructions from the hub parquet files (data/test-*.parquet): id, scenario, keywords,
    step, category, instruction as published, plus parquet_file / parquet_row locating each row's
    embedded image (use attach_images(df, "hades") to write the images out). step=5 keeps the last
    optimisation step, which the HADES evaluations use."""
    import pyarrow.parquet as pq

    hub = _Hub(_HADES_HUB.dataset, _HADES_HUB.repo_id, revision, _HADES_HUB.env_var, _HADES_HUB.include)
    root = _hub_root(hub, local_dir, ["data/test-*.parquet"])
    files = _hades_files(root)
    if not files:
        raise hub.unavailable(f"no data/test-*.parquet under {root}.")
    parts = []
    for f in files:
        names = pq.read_schema(f).names
        table = pq.read_table(f, columns=[c for c in names if c != "image"])
        part = table.to_pandas()
        part["parquet_file"] = str(f.resolve())
        part["parquet_row"] = range(len(part))
        parts.append(part)
    df = pd.concat(parts, ignore_index=True)
    missing = [c for c in HADES_REQUIRED if c not in df.columns]
    if missing:
        raise TuError(f"HADES parquet under {root} lacks columns {missing}; is this the current hub layout?")
    if step is not None:
        df = df[df["step"] == step].reset_index(drop=True)
    return df


# ---------------------------------------------------------------------------------------------
# images of hub-only / external image sets

_IMAGE_SOURCES = {
    "vlguard": ("VLGuard", "TU_VLGUARD_IMAGE_DIR",
                "the gated Hugging Face dataset ys-zong/VLGuard (accept its terms): `hf download ys-zong/VLGuard test.zip train.zip "
                "--repo-type dataset --local-dir <DIR>` and unzip; image_dir is the folder holding bad_ads/, hatefulMemes/, HOD/, "
                "harm-p/, privacyAlert/ (a train/ or test/ subfolder of it also works)"),
    "mm_safetybench": ("MM-SafetyBench", "TU_MMSAFETYBENCH_IMAGE_DIR",
                       "`MM-SafetyBench(imgs).zip` from the authors' Google Drive (file id 1xjW9k-aGkmwycqGCXbru70FaSKhSDcR_, "
                       "linked in the isXinLiu/MM-SafetyBench README); image_dir is the folder holding <scenario>/{SD,SD_TYPO,TYPO}/<id>.jpg "
                       "(or its parent containing `MM-SafetyBench(imgs)/` or `imgs/`)"),
    "hades": ("HADES", "TU_HADES_IMAGE_DIR",
              f"the Hugging Face dataset {HADES_ID}: `hf download {HADES_ID} --repo-type dataset --include 'data/*' --local-dir <DIR>`, "
              f"then load_hades(local_dir=<DIR>); its images are embedded in the parquet files and are written to image_dir"),
    "jailbreakv_28k": ("JailBreakV-28K", "TU_JAILBREAKV_DIR",
                       f"the Hugging Face dataset {JAILBREAKV_ID}: `hf download {JAILBREAKV_ID} --repo-type dataset --revision "
                       f"{JAILBREAKV_REVISION} --local-dir <DIR>`; image_dir is <DIR> or <DIR>/JailBreakV_28K"),
}


def _images_unavailable(dataset: str, why: str) -> HubDataUnavailable:
    name, env, where = _IMAGE_SOURCES[dataset]
    return HubDataUnavailable(f"{name} images are not available: {why}\nGet them from {where}; pass image_dir=<dir> or set {env}=<dir>.")


def _check_missing(dataset: str, paths: list[Path | None], names: list[str], shown_root: Path) -> None:
    """Raise if any row has no image, counting rows and distinct files (VLGuard rows share images)."""
    missing = [i for i, p in enumerate(paths) if p is None]
    if missing:
        files = sorted({names[i] for i in missing})
        raise _images_unavailable(
            dataset, f"{len(missing)} of {len(paths)} rows have no image file under {shown_root} "
                     f"({len(files)} distinct missing, e.g. {files[0]!r}).")


def attach_images(df: pd.DataFrame, dataset: str, image_dir=None, *, kind: str = "SD_TYPO") -> pd.DataFrame:
    """Return a copy of df with an `image_path` column (absolute path of each row's image file).

    dataset: "vlguard" (image column, relative to the unzipped train/test folder), "mm_safetybench"
    (<scenario>/<kind>/<question_id>.jpg, kind SD | SD_TYPO | TYPO; pair SD with `Rephrased
    Question(SD)` and the others with `Rephrased Question`, see MM_SAFETYBENCH_PROMPT_FIELD),
    "jailbreakv_28k" (image_path relative to JailBreakV_28K/) or "hades" (images embedded in the hub
    parquet; written once to image_dir/<parquet stem>/<row>.<ext>, default next to the parquet's
    data/ folder). Every image must exist: a missing folder or any missing file raises
    HubDataUnavailable saying how many are missing and where to get them."""
    _choose(dataset, tuple(_IMAGE_SOURCES), "image dataset")
    env = _IMAGE_SOURCES[dataset][1]
    image_dir = image_dir or os.environ.get(env)
    out = df.copy()
    if dataset == "hades":
        out["image_path"] = _hades_images(df, image_dir)
        return out
    if not image_dir:
        raise _images_unavailable(dataset, f"no image_dir given and {env} is unset.")
    root = Path(image_dir).expanduser()
    if not root.is_dir():
        raise _images_unavailable(dataset, f"directory {root} does not exist.")

    def first(cands: Iterable[Path]) -> Path | None:
        return next((c.resolve() for c in cands if c.is_file()), None)

    if dataset == "vlguard":
        roots = [root, root / "test", root / "train"]
        names = [str(rel) for rel in df["image"]]
        paths = [first(r / rel for r in roots) for rel in names]
    elif dataset == "mm_safetybench":
        _choose(kind, tuple(MM_SAFETYBENCH_PROMPT_FIELD), "MM-SafetyBench image kind")
        base = next((r for r in (root / "MM-SafetyBench(imgs)", root / "imgs") if r.is_dir()), root)
        # Some copies of the zip fix the upstream spelling of scenario 01; accept both.
        alt = {"01-Illegal_Activitiy": "01-Illegal_Activity"}
        names = [f"{sc}/{kind}/{q}.jpg" for sc, q in zip(df["scenario"], df["question_id"])]
        paths = [first(base / s / kind / f"{q}.jpg" for s in (sc, alt.get(sc, sc)))
                 for sc, q in zip(df["scenario"], df["question_id"])]
        root = base
        out["image_kind"] = kind
    else:  # jailbreakv_28k
        root = _jbv_base(root)
        names = [str(rel) for rel in df["image_path"]]
        paths = [first([root / rel]) if rel else None for rel in names]
    _check_missing(dataset, paths, names, root)
    out["image_path"] = [str(p) for p in paths]
    return out


def _image_ext(data: bytes, name: str | None) -> str:
    if name and Path(name).suffix:
        return Path(name).suffix.lower()
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return ".png"
    if data[:3] == b"\xff\xd8\xff":
        return ".jpg"
    return ".img"


def _hades_images(df: pd.DataFrame, image_dir) -> list[str]:
    """Write HADES' embedded images (HF Image struct {bytes, path}) to files once; reuse existing ones."""
    import pyarrow.parquet as pq

    if not {"parquet_file", "parquet_row"} <= set(df.columns):
        raise TuError("attach_images(df, 'hades') needs the parquet_file/parquet_row columns from load_hades().")
    result: list[str | None] = [None] * len(df)
    for pfile, group in pd.Series(range(len(df))).groupby(df["parquet_file"].to_numpy()):
        src = Path(pfile)
        if not src.is_file():
            raise _images_unavailable("hades", f"parquet file {src} is missing.")
        out_dir = Path(image_dir).expanduser() if image_dir else src.parent.parent / "tu_images"
        out_dir = out_dir / src.stem
        images = None
        for pos in group:
            row = int(df["parquet_row"].iloc[pos])
            existing = sorted(out_dir.glob(f"{row}.*")) if out_dir.is_dir() else []
            if existing:
                result[pos] = str(existing[0].resolve())
                continue
            if images is None:
                images = pq.read_table(src, columns=["image"]).column("image").to_pylist()
            cell = images[row] or {}
            data = cell.get("bytes") if isinstance(cell, dict) else None
            if not data:
                continue
            out_dir.mkdir(parents=True, exist_ok=True)
            target = out_dir / f"{row}{_image_ext(data, cell.get('path'))}"
            tmp = target.with_name(target.name + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(target)
            result[pos] = str(target.resolve())
    missing = sum(r is None for r in result)
    if missing:
        raise _images_unavailable("hades", f"{missing} of {len(result)} rows have no embedded image bytes.")
    return result  # type: ignore[return-value]
