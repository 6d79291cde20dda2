"""Typographic images: FigStep's and MM-SafetyBench's pages, and the organism's glyph grid.
"""
from __future__ import annotations

from .glyphs import CELL, GRID, GlyphRenderer, draw_token, figstep_layout, token_cells
from .pages import (
    FIGSTEP_TEXT_PROMPT,
    FontError,
    FontFallbackWarning,
    FontNotFoundError,
    FontSpec,
    RenderArgumentError,
    figstep_text,
    render_figstep,
    render_mmsafetybench_typo,
    resolve_font,
    stack_sd_typo,
    wrap_mmsafetybench,
)
