"""Cleaning of one corpus shard: pure functions over a raw shard frame, no Dagster.

Each document goes through five steps, in this order:

1. ``html_to_text`` (only for ``kind == "html"``; :mod:`llm_assets.data.html_text`): the stdlib
   ``html.parser`` keeps the visible text, drops scripts, styles and page boilerplate (nav,
   header, footer, ...), turns block elements into line breaks. The document's kind becomes
   ``"text"``.
2. ``normalize_text`` (:mod:`llm_assets.data.normalize`): Unicode normal form (NFKC by default),
   ``\\n`` newlines, no control or zero-width characters, no trailing whitespace. U+FFFD is kept:
   it marks bytes that were not valid UTF-8 upstream, and is counted in the statistics rather
   than hidden.
3. ``identify_language`` (:mod:`llm_assets.data.language`): lingua judges the document's letters;
   one in no target language is dropped (reason ``language``); one too short or too unsure to
   judge is kept as ``und``.
4. ``redact_pii`` (:mod:`llm_assets.data.pii`): each detected email, phone number, IP address,
   payment card number and API key becomes a typed placeholder (``<EMAIL>``...).
5. ``quality_signals`` / ``quality_failures`` (:mod:`llm_assets.data.quality`): Gopher-style
   heuristics on the cleaned text; a document failing any rule is dropped.

``clean_frame`` runs the steps over a frame and returns the kept documents (same columns, text
and sha256 replaced, plus ``language`` and ``pii_redactions``) with a ``CleanStats``. The residual PII
scan of a cleaned frame is ``scan_residual_pii`` in :mod:`llm_assets.data.residual_pii`, with
other detectors than the redactor's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import polars as pl

from llm_assets.data.html_text import html_to_text
from llm_assets.data.language import UNDETERMINED, checked_languages, identify_language
from llm_assets.data.normalize import normalize_text
from llm_assets.data.pii import checked_phone_regions, checked_pii_kinds, redact_pii
from llm_assets.data.quality import QUALITY_RULES, quality_failures, quality_signals
from llm_assets.manifest import CleanRecipe


@dataclass
class CleanStats:
    """What cleaning did to one shard. Each dropped document is counted once, under the first rule
    it fails ("language", then QUALITY_RULES order), so documents_in == documents_out +
    sum(dropped_by_reason)."""

    documents_in: int = 0
    documents_out: int = 0
    html_converted: int = 0
    replacement_chars: int = 0  # U+FFFD left in the kept text: bytes that were not valid UTF-8
    pii_redacted: dict[str, int] = field(default_factory=dict)  # per kind, in the kept documents
    dropped_by_reason: dict[str, int] = field(default_factory=dict)
    languages_in: dict[str, int] = field(default_factory=dict)  # documents per identified language
    languages_out: dict[str, int] = field(default_factory=dict)  # kept documents per language
    chars_in: int = 0  # all input documents, before cleaning
    chars_out: int = 0  # kept documents, after cleaning

    @property
    def kept_fraction(self) -> float:
        """Documents kept over documents in; 1.0 for an empty shard, where nothing was dropped."""
        return self.documents_out / self.documents_in if self.documents_in else 1.0

    def language_kept_fractions(self, languages: Iterable[str]) -> dict[str, float]:
        """Per language of ``languages`` that has documents: the fraction of them kept."""
        return {lang: self.languages_out.get(lang, 0) / self.languages_in[lang]
                for lang in languages if self.languages_in.get(lang)}

    @classmethod
    def combine(cls, parts: Iterable[CleanStats]) -> CleanStats:
        """The statistics of a shard cleaned in pieces: every counter added up."""
        total = cls()
        for part in parts:
            for name, value in asdict(part).items():
                if isinstance(value, dict):
                    merged = getattr(total, name)
                    for key, count in value.items():
                        merged[key] = merged.get(key, 0) + count
                else:
                    setattr(total, name, getattr(total, name) + value)
        return total

    def as_metadata(self) -> dict[str, int | float | dict[str, int]]:
        return {**asdict(self), "kept_fraction": self.kept_fraction}


def clean_frame(frame: pl.DataFrame, recipe: CleanRecipe) -> tuple[pl.DataFrame, CleanStats]:
    """Clean a raw shard frame (id, text, source, uri, kind, sha256).

    Returns the kept documents in their original order with the same columns (text cleaned, kind
    "html" become "text", sha256 of the cleaned text) plus ``language`` (ISO 639-1, or "und") and
    ``pii_redactions`` (Int64, redactions in the document), and the shard's statistics.
    """
    stats = CleanStats(
        documents_in=frame.height,
        pii_redacted=dict.fromkeys(recipe.redact, 0),
        dropped_by_reason=dict.fromkeys(("language", *QUALITY_RULES), 0),
    )
    redact = checked_pii_kinds(recipe.redact)
    regions = checked_phone_regions(recipe.phone_regions)
    targets = checked_languages(recipe.languages)
    keep: list[bool] = []
    texts: list[str] = []
    kinds: list[str] = []
    languages: list[str] = []
    redactions: list[int] = []
    for text, kind in zip(frame["text"].to_list(), frame["kind"].to_list()):
        text = text or ""
        stats.chars_in += len(text)
        if kind == "html":
            text, kind = html_to_text(text), "text"
            stats.html_converted += 1
        text = normalize_text(text, recipe.unicode_form)
        language = identify_language(text, targets, recipe.language_min_letters, recipe.language_min_confidence)
        stats.languages_in[language] = stats.languages_in.get(language, 0) + 1
        if language != UNDETERMINED and language not in targets:
            keep.append(False)
            stats.dropped_by_reason["language"] += 1
            continue
        text, found = redact_pii(text, redact, regions)
        failures = quality_failures(quality_signals(text), recipe)
        keep.append(not failures)
        if failures:
            stats.dropped_by_reason[failures[0]] += 1
            continue
        stats.languages_out[language] = stats.languages_out.get(language, 0) + 1
        languages.append(language)
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
        pl.Series("language", languages, dtype=pl.String),
        pl.Series("pii_redactions", redactions, dtype=pl.Int64),
    )
    return cleaned, stats

