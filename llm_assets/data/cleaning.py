"""Cleaning of one corpus shard: pure functions over a raw shard frame, no Dagster.

Each document goes through four steps, in this order:

1. ``html_to_text`` (only for ``kind == "html"``; :mod:`llm_assets.data.html_text`): the stdlib
   ``html.parser`` keeps the visible text, drops scripts, styles and page boilerplate (nav,
   header, footer, ...), turns block elements into line breaks. The document's kind becomes
   ``"text"``.
2. ``normalize_text`` (:mod:`llm_assets.data.normalize`): Unicode normal form (NFKC by default),
   ``\\n`` newlines, no control or zero-width characters, no trailing whitespace. U+FFFD is kept:
   it marks bytes that were not valid UTF-8 upstream, and is counted in the statistics rather
   than hidden.
3. ``redact_pii`` (:mod:`llm_assets.data.pii`): each detected email, phone number, IP address,
   payment card number and API key becomes a typed placeholder (``<EMAIL>``...).
4. ``quality_signals`` / ``quality_failures`` (:mod:`llm_assets.data.quality`): Gopher-style
   heuristics on the cleaned text; a document failing any rule is dropped.

``clean_frame`` runs the steps over a frame and returns the kept documents (same columns, text
and sha256 replaced, plus ``pii_redactions``) with a ``CleanStats``. The residual PII scan of a
cleaned frame is ``scan_pii_frame`` in :mod:`llm_assets.data.pii`.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field

import polars as pl

from llm_assets.data.html_text import html_to_text
from llm_assets.data.normalize import normalize_text
from llm_assets.data.pii import checked_pii_kinds, redact_pii
from llm_assets.data.quality import QUALITY_RULES, quality_failures, quality_signals
from llm_assets.manifest import CleanRecipe


@dataclass
class CleanStats:
    """What cleaning did to one shard. Each dropped document is counted once, under the first rule
    it fails (QUALITY_RULES order), so documents_in == documents_out + sum(dropped_by_reason)."""

    documents_in: int = 0
    documents_out: int = 0
    html_converted: int = 0
    replacement_chars: int = 0  # U+FFFD left in the kept text: bytes that were not valid UTF-8
    pii_redacted: dict[str, int] = field(default_factory=dict)  # per kind, in the kept documents
    dropped_by_reason: dict[str, int] = field(default_factory=dict)
    chars_in: int = 0  # all input documents, before cleaning
    chars_out: int = 0  # kept documents, after cleaning

    @property
    def kept_fraction(self) -> float:
        """Documents kept over documents in; 1.0 for an empty shard, where nothing was dropped."""
        return self.documents_out / self.documents_in if self.documents_in else 1.0

    def as_metadata(self) -> dict[str, int | float | dict[str, int]]:
        return {**asdict(self), "kept_fraction": self.kept_fraction}


def clean_frame(frame: pl.DataFrame, recipe: CleanRecipe) -> tuple[pl.DataFrame, CleanStats]:
    """Clean a raw shard frame (id, text, source, uri, kind, sha256).

    Returns the kept documents in their original order with the same columns (text cleaned, kind
    "html" become "text", sha256 of the cleaned text) plus ``pii_redactions`` (Int64, redactions
    in the document), and the shard's statistics.
    """
    stats = CleanStats(
        documents_in=frame.height,
        pii_redacted=dict.fromkeys(recipe.redact, 0),
        dropped_by_reason=dict.fromkeys(QUALITY_RULES, 0),
    )
    redact = checked_pii_kinds(recipe.redact)
    keep: list[bool] = []
    texts: list[str] = []
    kinds: list[str] = []
    redactions: list[int] = []
    for text, kind in zip(frame["text"].to_list(), frame["kind"].to_list()):
        text = text or ""
        stats.chars_in += len(text)
        if kind == "html":
            text, kind = html_to_text(text), "text"
            stats.html_converted += 1
        text = normalize_text(text, recipe.unicode_form)
        text, found = redact_pii(text, redact)
        failures = quality_failures(quality_signals(text), recipe)
        keep.append(not failures)
        if failures:
            stats.dropped_by_reason[failures[0]] += 1
            continue
        for pii_kind, count in found.items():
            stats.pii_redacted[pii_kind] += count
        texts.append(text)
        kinds.append(kind)
        redactions.append(sum(found.values()))
        stats.chars_out += len(text)
        stats.replacement_chars += text.count("\ufffd")
    stats.documents_out = len(texts)
    cleaned = frame.filter(pl.Series(keep, dtype=pl.Boolean)).with_columns(
        pl.Series("text", texts, dtype=pl.String),
        pl.Series("kind", kinds, dtype=pl.String),
        pl.Series("sha256", [hashlib.sha256(t.encode()).hexdigest() for t in texts], dtype=pl.String),
        pl.Series("pii_redactions", redactions, dtype=pl.Int64),
    )
    return cleaned, stats

