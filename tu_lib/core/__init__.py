"""The bottom layer: errors, paths, hashing and atomic outputs, run records, text helpers.

Every other layer may import it; it imports no other part of tu_lib. `params`, `plots`, `stats`, `device`
and `hub` are submodules imported by name.
"""
from __future__ import annotations

from .errors import DataFileError, HubDataUnavailable, HubModelUnavailable, ParameterError, TuError
from .files import (
    OUTPUT_MARKER,
    atomic_dir,
    atomic_path,
    check_output_dir,
    claim_output_dir,
    damaged_files,
    file_hashes,
    hash_problem,
    output_dir_problem,
    output_owner,
    read_checksums,
    read_jsonl,
    record_hash,
    sha256_file,
    sha256_text,
    verified_path,
    verify_all,
    write_csv,
    write_json,
    write_jsonl,
)
from .paths import REPO_ROOT, cache_dir, data_dir, repo_root, runs_dir
from .records import compute_facts, git_commit, note_model_dtype, run_record
from .text import as_list, list_check, normalise_prompt, take
