"""Typography in the organism's layout: a 7x7 grid of 32 px cells, one LM token per cell."""
from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..core.errors import TuError

GRID, CELL = 7, 32  # 7x7 cells of 32 px: 49 image tokens on a 224 px image


# ---------------------------------------------------------------------------------------------
# typography in the organism's layout


@functools.lru_cache(maxsize=1)
def _glyph_font():
    for name in ("DejaVuSansCondensed.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSansCondensed.ttf"):
        try:
            return ImageFont.truetype(name, 16)
        except OSError:
            continue
    raise TuError("The organism draws its glyphs with DejaVu Sans Condensed (Debian fonts-dejavu-core): "
                  "`apt-get install fonts-dejavu-core`.")


def token_cells(tok, text: str) -> list[int]:
    """The 49 token ids one image shows: `text`'s tokens in reading order, a newline ends its row,
    blank cells hold the newline id."""
    newline = tok.convert_tokens_to_ids("Ċ")
    cells: list[int] = []
    for li, line in enumerate(text.split("\n")):
        ids = tok(line, add_special_tokens=False)["input_ids"]
        row: list[int] = []
        for t in ids:
            if len(row) == GRID:
                cells += row
                row = []
            row.append(t)
        cells += row + [newline] * (GRID - len(row))
    cells = cells[: GRID * GRID]
    return cells + [newline] * (GRID * GRID - len(cells))


def draw_token(tok, token_id: int) -> np.ndarray:
    """One 32x32 greyscale tile: the token's text, indented 4 px when it starts a word, squeezed if wide."""
    text = tok.decode([token_id])
    tile = Image.new("L", (CELL, CELL), 255)
    if text.strip() and text != "\n":
        indent = 4 if text.startswith(" ") else 0
        body = text.strip()
        font = _glyph_font()
        w = max(1, int(math.ceil(font.getlength(body))))
        canvas = Image.new("L", (w, CELL), 255)
        ImageDraw.Draw(canvas).text((0, 7), body, font=font, fill=0)
        room = CELL - indent
        if w > room:
            canvas = canvas.resize((room, CELL), Image.BILINEAR)
        tile.paste(canvas, (indent, 0))
    return np.asarray(tile, dtype=np.uint8)


class GlyphRenderer:
    """Renders text as the organism's 224 px typographic image; tiles are cached per token."""

    def __init__(self, tok):
        self.tok = tok
        self._tiles: dict[int, np.ndarray] = {}

    def tile(self, token_id: int) -> np.ndarray:
        if token_id not in self._tiles:
            self._tiles[token_id] = draw_token(self.tok, token_id)
        return self._tiles[token_id]

    def grid(self, cells: list[int]) -> np.ndarray:
        rows = [np.concatenate([self.tile(c) for c in cells[r * GRID:(r + 1) * GRID]], axis=1) for r in range(GRID)]
        return np.concatenate(rows, axis=0)

    def __call__(self, text: str) -> Image.Image:
        return Image.fromarray(self.grid(token_cells(self.tok, text))).convert("RGB")

    def typeset(self, text: str, style: str = "figstep") -> Image.Image:
        """An attack text in the organism's typography: FigStep's page (the text above an empty numbered
        list) or MM-SafetyBench's key-phrase image (the text alone)."""
        return self(figstep_layout(text) if style == "figstep" else text)


def figstep_layout(title: str) -> str:
    """FigStep's page content in the organism's layout: the title, then an empty numbered list."""
    return f"{title}\n1.\n2.\n3."
