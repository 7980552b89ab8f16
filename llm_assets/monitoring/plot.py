"""The drift figures of one model size over its traffic windows, as an inline plot for the UI."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from llm_assets.plots import figure_markdown, new_figure


def figures_over_windows(rows: Sequence[tuple[str, Mapping[str, float]]], names: Sequence[str], title: str) -> str:
    """One small panel per figure in `names`, over the windows of `rows` ((window, figures), in order)."""
    figure = new_figure(figsize=(6, 1.6 * len(names)), dpi=80)
    axes = figure.subplots(len(names), 1, sharex=True, squeeze=False)
    windows = [window for window, _ in rows]
    for axis, name in zip(axes[:, 0], names, strict=True):
        values = [float(figures.get(name, math.nan)) for _, figures in rows]
        axis.plot(range(len(windows)), values, "o-", markersize=3)
        axis.set_ylabel(name.removeprefix("drift."), fontsize=7)
    axes[-1, 0].set_xticks(range(len(windows)), windows, rotation=30, fontsize=6, ha="right")
    axes[0, 0].set_title(title)
    return figure_markdown(figure, title)
