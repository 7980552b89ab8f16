"""Plots for the UI: small PNGs inlined as markdown, so they show in an asset's metadata.

Figures are made with matplotlib's object API (`new_figure`), not pyplot: no global state or
backend to set, and a step does not pay for importing pyplot.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def new_figure(**kwargs: Any) -> Figure:
    """An empty matplotlib Figure (`Figure(**kwargs)`); matplotlib is imported by the first plot."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def figure_markdown(figure: Figure, alt: str) -> str:
    """Render a matplotlib figure as an inline markdown image."""
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    return f"![{alt}](data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()})"


def loss_curve_markdown(train: Sequence[Sequence[float]], val: Sequence[Sequence[float]], title: str) -> str:
    """Train loss per step and val loss at its evaluations, from [step, loss] pairs."""
    figure = new_figure(figsize=(6, 3.2), dpi=90)
    axis = figure.subplots()
    axis.plot([p[0] for p in train], [p[1] for p in train], label="train", linewidth=1)
    if val:
        axis.plot([p[0] for p in val], [p[1] for p in val], "o-", label="val", markersize=3)
    axis.set(xlabel="step", ylabel="loss", title=title)
    axis.legend()
    return figure_markdown(figure, "loss curve")
