"""Figures: every PNG is written together with the CSV behind it (nbval cannot compare images,
so tests compare the CSV), with fixed metadata so reruns give identical files."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from .files import atomic_path, write_csv  # noqa: E402


def theme() -> None:
    sns.set_theme(style="whitegrid", context="notebook", font="DejaVu Sans")


def save_figure(fig, data: pd.DataFrame, stem: str, fig_dir: str | Path) -> dict[str, Path]:
    """Write <fig_dir>/<stem>.png and <stem>.csv; returns both paths."""
    fig_dir = Path(fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    png, csv = fig_dir / f"{stem}.png", fig_dir / f"{stem}.csv"
    write_csv(data, csv)
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return {"png": png, "csv": csv}


def set_counts_figure(counts: pd.DataFrame, categories: pd.DataFrame):
    """Two panels: items per set (coloured by role) and the category mix of each harmful evaluation set."""
    theme()
    pivot = categories.pivot_table(index="category", columns="set", values="n", fill_value=0, aggfunc="sum")
    fig, axes = plt.subplots(1, 2, figsize=(15, max(6.0, 0.3 * len(pivot))), gridspec_kw={"width_ratios": [1, 1.3]})
    sns.barplot(data=counts, y="set", x="n", hue="role", dodge=False, ax=axes[0])
    axes[0].set(title="Items per set", xlabel="items", ylabel="")
    for container in axes[0].containers:
        axes[0].bar_label(container, fontsize=8, padding=2)
    sns.heatmap(pivot, mask=pivot == 0, annot=True, fmt="g", cmap="Blues", cbar=False, linewidths=0.5,
                linecolor="#eeeeee", yticklabels=True, ax=axes[1], annot_kws={"fontsize": 8})
    axes[1].set(title="Categories of the harmful evaluation sets (source taxonomies)", xlabel="", ylabel="")
    axes[1].tick_params(axis="y", labelsize=8)
    axes[1].tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    return fig
