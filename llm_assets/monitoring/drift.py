"""The drift figures of one model size and traffic window: pure functions, no Dagster.

- `drift.js_divergence`: Jensen–Shannon divergence (base 2, so in [0, 1]) between the token unigram
  distribution of the served prompts and that of training documents, both under the served
  model's tokenizer.
- `drift.perplexity_ratio`: the model's perplexity on the served prompts over its perplexity on
  held-out (test split) documents, measured the same way (quantization's `heldout_quality`).
- `drift.latency_p50_s`, `drift.latency_p99_s`, `drift.ttft_p99_s`, `drift.error_rate`: SLO
  figures of the window's requests (errors: status ≥ 500; a client's 4xx is not the server's error).
- `drift.feedback_score`: the mean rating (+1 / −1) of the window's feedback; NaN without feedback.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from llm_assets.quantize.worker import heldout_quality, token_sequences

JS = "drift.js_divergence"
PERPLEXITY_RATIO = "drift.perplexity_ratio"
LATENCY_P50, LATENCY_P99, TTFT_P99 = "drift.latency_p50_s", "drift.latency_p99_s", "drift.ttft_p99_s"
ERROR_RATE, FEEDBACK_SCORE = "drift.error_rate", "drift.feedback_score"
FIGURES = (JS, PERPLEXITY_RATIO, LATENCY_P50, LATENCY_P99, TTFT_P99, ERROR_RATE, FEEDBACK_SCORE)
# The gates a fine-tune can answer (drift_gates: their failure triggers one) and the SLO gates, which
# it cannot (slo_gates: they alert).
DRIFT_GATES = (JS, PERPLEXITY_RATIO, FEEDBACK_SCORE)
SLO_GATES = (LATENCY_P50, LATENCY_P99, TTFT_P99, ERROR_RATE)
# What needs the served prompts' texts (logged only with `serve --log-prompts`).
TEXT_FIGURES = (JS, PERPLEXITY_RATIO)


class NoPromptTextError(ValueError):
    """The window has requests but not one logged prompt text: the distribution figures cannot be measured."""


def unigram_counts(texts: Sequence[str], tokenizer: Any) -> np.ndarray:
    """Token counts of `texts` under `tokenizer` (a transformers tokenizer), over its vocabulary."""
    counts = np.zeros(len(tokenizer), dtype=np.int64)
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        np.add.at(counts, ids, 1)
    return counts


def js_divergence(p_counts: np.ndarray, q_counts: np.ndarray) -> float:
    """Jensen–Shannon divergence in bits between two count vectors (normalised here); 0 for the
    same distribution, 1 for disjoint supports."""
    if p_counts.sum() == 0 or q_counts.sum() == 0:
        raise ValueError("js_divergence: a distribution has no tokens")
    p, q = p_counts / p_counts.sum(), q_counts / q_counts.sum()
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        nonzero = a > 0
        return float(np.sum(a[nonzero] * np.log2(a[nonzero] / m[nonzero])))

    return (kl(p) + kl(q)) / 2


def perplexity(model: Any, tokenizer: Any, texts: Sequence[str], max_tokens: int) -> float:
    return heldout_quality(model, token_sequences(tokenizer, list(texts), max_tokens))[0].perplexity


def served_prompts(requests: pl.DataFrame, limit: int) -> list[str]:
    """The logged prompt texts of the window, the first `limit` (in time order)."""
    prompts = [p for row in requests["prompts"].to_list() if row for p in row if p.strip()]
    return prompts[:limit]


def slo_figures(requests: pl.DataFrame) -> dict[str, float]:
    nan = float("nan")
    if requests.is_empty():
        return {LATENCY_P50: nan, LATENCY_P99: nan, TTFT_P99: nan, ERROR_RATE: nan}
    latency = requests["latency_s"].drop_nulls()
    ttft = requests["first_token_s"].drop_nulls()

    def quantile(series: pl.Series, q: float) -> float:
        return float(series.quantile(q, interpolation="linear")) if len(series) else nan

    return {LATENCY_P50: quantile(latency, 0.5), LATENCY_P99: quantile(latency, 0.99),
            TTFT_P99: quantile(ttft, 0.99), ERROR_RATE: float((requests["status"] >= 500).mean())}


def feedback_score(feedback: pl.DataFrame) -> float:
    ratings = feedback["rating"].drop_nulls()
    return float(ratings.mean()) if len(ratings) else float("nan")


@dataclass(frozen=True)
class DriftInputs:
    """What the figures of one window are measured on besides its traffic."""

    reference_texts: Sequence[str]  # training documents: the unigram reference
    heldout_texts: Sequence[str]  # test-split documents: the perplexity reference
    max_prompts: int
    max_tokens: int


def drift_figures(requests: pl.DataFrame, feedback: pl.DataFrame, model: Any, tokenizer: Any,
                  inputs: DriftInputs) -> dict[str, float]:
    """Every figure of FIGURES for one window. Raises NoPromptTextError when the window has
    requests but no prompt text (the server ran without --log-prompts)."""
    figures = {**slo_figures(requests), FEEDBACK_SCORE: feedback_score(feedback)}
    prompts = served_prompts(requests, inputs.max_prompts)
    if not prompts:
        if requests.height:
            raise NoPromptTextError(
                f"{requests.height} request(s) but no prompt text in the log: the server ran without "
                "--log-prompts, and drift of the prompts cannot be measured without them. Restart it with "
                "`llm-assets serve --log-prompts` (texts are PII-redacted on ingestion)")
        return {**figures, JS: math.nan, PERPLEXITY_RATIO: math.nan}
    figures[JS] = js_divergence(unigram_counts(prompts, tokenizer), unigram_counts(inputs.reference_texts, tokenizer))
    figures[PERPLEXITY_RATIO] = (perplexity(model, tokenizer, prompts, inputs.max_tokens)
                                 / perplexity(model, tokenizer, inputs.heldout_texts, inputs.max_tokens))
    return figures
