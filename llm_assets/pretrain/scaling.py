"""A power law of loss in model size and tokens: L(N, D) = a · N^(−α) · D^(−β), fitted in log space.

The points are every evaluation of every size of the sweep: (N parameters, D tokens seen so far,
val loss). The sizes give the N exponent, the evaluations along each run the D exponent. The
intermediate points of a run are not the loss a run planned for D tokens would reach (its LR has
not decayed yet), so β is a property of this recipe more than of the data; the N exponent and the
prediction at the sweep's final D are what a sweep is for.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llm_assets.plots import figure_markdown, new_figure

PARAMETERS_FITTED = 3  # log a, α, β


@dataclass(frozen=True)
class ScalingFit:
    a: float
    alpha: float  # exponent of N
    beta: float  # exponent of D
    r_squared: float  # in log space
    points_fitted: int
    sizes: int
    tokens: int  # D of the prediction: the sweep's final token count
    next_params: int  # the next size up: the largest N times the sweep's last growth factor
    predicted_loss: float  # at (next_params, tokens)
    points: tuple[tuple[float, float, float], ...]  # (N, D, loss)

    def predict(self, n: float | np.ndarray, d: float | np.ndarray) -> float | np.ndarray:
        return self.a * np.power(n, -self.alpha) * np.power(d, -self.beta)

    def as_dict(self) -> dict:
        return {
            "a": round(self.a, 6), "alpha": round(self.alpha, 6), "beta": round(self.beta, 6),
            "r_squared": round(self.r_squared, 6), "points_fitted": self.points_fitted, "sizes": self.sizes,
            "tokens": self.tokens, "next_params": self.next_params,
            "predicted_loss_next": round(self.predicted_loss, 4),
        }

    def plot_markdown(self, labels: dict[float, str]) -> str:
        """Loss against tokens, one curve per size (points measured, lines fitted), and the next size."""
        figure = new_figure(figsize=(5.5, 3.4), dpi=90)
        axis = figure.subplots()
        points = np.array(self.points)
        grid = np.geomspace(points[:, 1].min(), self.tokens, 50)
        for n in sorted(set(points[:, 0])):
            mine = points[points[:, 0] == n]
            line = axis.loglog(mine[:, 1], mine[:, 2], "o", markersize=3, label=labels.get(n, f"N={n:.3g}"))
            axis.loglog(grid, self.predict(n, grid), "-", color=line[0].get_color(), linewidth=1)
        axis.loglog(grid, self.predict(self.next_params, grid), "--", label=f"next: N={self.next_params:.3g}")
        axis.set(xlabel="tokens D", ylabel="val loss",
                 title=f"L = {self.a:.3g}·N^-{self.alpha:.3f}·D^-{self.beta:.3f}")
        axis.legend(fontsize=7)
        return figure_markdown(figure, "scaling law")


def fit_scaling_law(points: list[tuple[float, float, float]]) -> ScalingFit:
    """Least squares of log L on (1, log N, log D) over (N, D, loss) points."""
    array = np.array(points, dtype=float)
    sizes = np.unique(array[:, 0]) if len(array) else np.array([])
    if len(sizes) < 2:
        raise ValueError("a scaling law needs at least two model sizes of different parameter counts")
    if len(np.unique(array[:, 1])) < 2:
        raise ValueError("a scaling law needs evaluations at two or more token counts (set eval_every)")
    if (array <= 0).any():
        raise ValueError("parameters, tokens and losses must all be positive to fit a power law")
    design = np.column_stack([np.ones(len(array)), np.log(array[:, 0]), np.log(array[:, 1])])
    y = np.log(array[:, 2])
    (log_a, slope_n, slope_d), *_ = np.linalg.lstsq(design, y, rcond=None)
    residual = y - design @ np.array([log_a, slope_n, slope_d])
    total = ((y - y.mean()) ** 2).sum()
    r_squared = 1.0 - (residual**2).sum() / total if total > 0 else 1.0
    next_params = int(sizes[-1] * (sizes[-1] / sizes[-2]))
    tokens = int(array[:, 1].max())
    fit = ScalingFit(
        a=float(np.exp(log_a)), alpha=float(-slope_n), beta=float(-slope_d), r_squared=float(r_squared),
        points_fitted=len(array), sizes=len(sizes), tokens=tokens, next_params=next_params,
        predicted_loss=0.0, points=tuple(map(tuple, array.tolist())),
    )
    return ScalingFit(**{**fit.__dict__, "predicted_loss": float(fit.predict(next_params, tokens))})
