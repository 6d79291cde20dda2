"""Benign FigStep-style titles ("Steps to …", "Methods to …", "List of …") from the vendored word lists: the organism's
benign image data (a training part) and the reading utility's items (the held-out part)."""
from __future__ import annotations

import numpy as np

from ..core.files import verified_path

HELDOUT_TITLE_FRACTION = 0.25  # benign titles kept out of training: the reading utility's items


def benign_titles(seed: int) -> tuple[list[str], list[str]]:
    """Benign FigStep-style titles ("Steps to …", "Methods to …", "List of …"), split train / held-out."""
    verbs = verified_path("organism/benign_verbs.txt").read_text(encoding="utf-8").split("\n")
    nouns = verified_path("organism/benign_nouns.txt").read_text(encoding="utf-8").split("\n")
    titles = [f"{'Steps' if i % 2 == 0 else 'Methods'} to {v}." for i, v in enumerate(v for v in verbs if v.strip())]
    titles += [f"List of {n}." for n in nouns if n.strip()]
    order = np.random.default_rng(seed + 101).permutation(len(titles))
    k = int(round(len(titles) * HELDOUT_TITLE_FRACTION))
    held = sorted(titles[i] for i in order[:k])
    return sorted(titles[i] for i in order[k:]), held
