"""Plots for the UI: small PNGs inlined as markdown, so they show in an asset's metadata."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence


def figure_markdown(figure, alt: str) -> str:
    """Render a matplotlib figure as an inline markdown image (and close it)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return f"![{alt}](data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()})"


def loss_curve_markdown(train: Sequence[Sequence[float]], val: Sequence[Sequence[float]], title: str) -> str:
    """Train loss per step and val loss at its evaluations, from [step, loss] pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.2), dpi=90)
    axis.plot([p[0] for p in train], [p[1] for p in train], label="train", linewidth=1)
    if val:
        axis.plot([p[0] for p in val], [p[1] for p in val], "o-", label="val", markersize=3)
    axis.set(xlabel="step", ylabel="loss", title=title)
    axis.legend()
    return figure_markdown(figure, "loss curve")
