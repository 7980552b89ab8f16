"""Users' feedback turned into post-training data: pure functions, no Dagster.

A feedback record names the completion it rates (`completion_id`, the request's `id`). Joined with
that request's logged prompt and answer (both PII-redacted by `serving_traffic`):

- rating +1, no correction → an SFT example (prompt, the answer the user liked);
- a correction → a preference pair (prompt, chosen: the correction, rejected: the model's answer);
- rating −1 without a correction says what not to answer but not what to: it is counted, not used.

Feedback whose request is not in the traffic (another size's, or logged without --log-prompts) is
counted as unmatched. Examples are decontaminated against the eval sets exactly as the post-training
data is (`drop_eval_overlap`): a user who pastes a benchmark question does not leak it into training.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import polars as pl

from llm_assets.posttrain.dataset_schema import PREFERENCE_COLUMNS, SFT_COLUMNS
from llm_assets.posttrain.decontaminate import drop_eval_overlap

SFT_FILE, PREFERENCE_FILE = "sft.jsonl", "preferences.jsonl"


@dataclass
class FeedbackData:
    sft: pl.DataFrame
    preferences: pl.DataFrame
    stats: dict[str, int | dict[str, int]] = field(default_factory=dict)


def feedback_data(requests: pl.DataFrame, feedback: pl.DataFrame, eval_texts: Mapping[str, Sequence[str]],
                  ngram: int) -> FeedbackData:
    """SFT examples and preference pairs from `feedback` joined with `requests` (serving_traffic's
    frames, any number of windows concatenated), decontaminated against `eval_texts`."""
    answered = requests.filter(pl.col("prompts").is_not_null() & pl.col("completions").is_not_null()).select(
        pl.col("id").alias("completion_id"), pl.col("prompts").list.first().alias("prompt"),
        pl.col("completions").list.first().alias("completion"))
    joined = feedback.join(answered, on="completion_id", how="inner")
    source = pl.lit("feedback")
    sft = joined.filter((pl.col("rating") > 0) & pl.col("correction").is_null()).select(
        pl.col("id"), source.alias("source"), "prompt", "completion")
    pairs = joined.filter(pl.col("correction").is_not_null() & (pl.col("correction") != pl.col("completion"))).select(
        pl.col("id"), source.alias("source"), "prompt", pl.col("correction").alias("chosen"),
        pl.col("completion").alias("rejected"))
    sft, sft_dropped = drop_eval_overlap(sft.select(SFT_COLUMNS), ["completion"], eval_texts, ngram)
    pairs, pair_dropped = drop_eval_overlap(pairs.select(PREFERENCE_COLUMNS), ["chosen", "rejected"], eval_texts, ngram)
    stats = {"feedback": feedback.height, "unmatched": feedback.height - joined.height,
             "negative_without_correction": joined.filter((pl.col("rating") < 0)
                                                          & pl.col("correction").is_null()).height,
             "sft_examples": sft.height, "preference_pairs": pairs.height,
             "dropped_overlap": {name: sft_dropped[name] + pair_dropped[name] for name in sft_dropped}}
    return FeedbackData(sft, pairs, stats)
