"""The scaling fit recovers a planted law and refuses points it cannot fit."""

from __future__ import annotations

import itertools

import pytest

from llm_assets.pretrain.scaling import fit_scaling_law


def law(n: float, d: float) -> float:
    return 40.0 * n**-0.12 * d**-0.07


def test_a_planted_law_is_recovered_and_the_next_size_predicted() -> None:
    sizes, tokens = [1e6, 2e6, 4e6], [1e5, 2e5, 4e5, 8e5]
    fit = fit_scaling_law([(n, d, law(n, d)) for n, d in itertools.product(sizes, tokens)])
    assert fit.alpha == pytest.approx(0.12, abs=1e-9) and fit.beta == pytest.approx(0.07, abs=1e-9)
    assert fit.r_squared == pytest.approx(1.0) and fit.points_fitted == 12 and fit.sizes == 3
    assert fit.next_params == 8_000_000 and fit.tokens == 800_000
    assert fit.predicted_loss == pytest.approx(law(8e6, 8e5), rel=1e-9)
    assert fit.plot_markdown({1e6: "s"}).startswith("![scaling law](data:image/png;base64,")


def test_noise_lowers_r_squared() -> None:
    points = [(n, d, law(n, d) * (1.3 if i % 2 else 0.8)) for i, (n, d) in
              enumerate(itertools.product([1e6, 2e6], [1e5, 2e5, 4e5]))]
    assert fit_scaling_law(points).r_squared < 0.9


@pytest.mark.parametrize(("points", "message"), [
    ([(1e6, 1e5, 3.0), (1e6, 2e5, 2.9)], "two model sizes"),
    ([(1e6, 1e5, 3.0), (2e6, 1e5, 2.9)], "two or more token counts"),
    ([(1e6, 1e5, 3.0), (2e6, 2e5, 0.0)], "must all be positive"),
])
def test_points_that_cannot_be_fitted_are_refused(points, message) -> None:
    with pytest.raises(ValueError, match=message):
        fit_scaling_law(points)
