"""A power law of loss against model size: L(N) = a · N^(−α), fitted in log-log space.

Every size of the sweep trains on the same tokens, so D is constant and only the N exponent can
be fitted; with two sizes the line passes through both points exactly (R² = 1 says nothing), so
the fit-quality gate only judges R² from three sizes on.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PowerLawFit:
    a: float
    alpha: float
    r_squared: float
    points_fitted: int
    next_params: int  # the next size up: the largest N times the sweep's last growth factor
    predicted_loss: float
    params: tuple[float, ...]
    losses: tuple[float, ...]

    def predict(self, n: float | np.ndarray) -> float | np.ndarray:
        return self.a * np.power(n, -self.alpha)

    def as_dict(self) -> dict:
        return {
            "a": round(self.a, 6), "alpha": round(self.alpha, 6), "r_squared": round(self.r_squared, 6),
            "points_fitted": self.points_fitted, "next_params": self.next_params,
            "predicted_loss_next": round(self.predicted_loss, 4),
        }

    def plot_markdown(self, labels: list[str]) -> str:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(5, 3.2), dpi=90)
        axis.loglog(self.params, self.losses, "o", label="model sizes")
        for n, loss, label in zip(self.params, self.losses, labels):
            axis.annotate(label, (n, loss), textcoords="offset points", xytext=(4, 4), fontsize=7)
        grid = np.geomspace(min(self.params), self.next_params, 50)
        axis.loglog(grid, self.predict(grid), "-", label=f"L = {self.a:.3g}·N^-{self.alpha:.3f}")
        axis.loglog([self.next_params], [self.predicted_loss], "x", label="next size (predicted)")
        axis.set(xlabel="parameters N", ylabel="final val loss")
        axis.legend(fontsize=7)
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        plt.close(figure)
        return f"![scaling law](data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()})"


def fit_power_law(params: np.ndarray, losses: np.ndarray) -> PowerLawFit:
    if len(params) < 2 or len(set(params.tolist())) < 2:
        raise ValueError("a power law needs at least two model sizes of different parameter counts")
    x, y = np.log(params), np.log(losses)
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (intercept + slope * x)
    total = ((y - y.mean()) ** 2).sum()
    r_squared = 1.0 - (residual**2).sum() / total if total > 0 else 1.0
    order = np.sort(params)
    next_params = int(order[-1] * (order[-1] / order[-2]))
    fit = PowerLawFit(
        a=float(np.exp(intercept)), alpha=float(-slope), r_squared=float(r_squared), points_fitted=len(params),
        next_params=next_params, predicted_loss=0.0, params=tuple(params.tolist()), losses=tuple(losses.tolist()),
    )
    return PowerLawFit(**{**fit.__dict__, "predicted_loss": float(fit.predict(next_params))})
