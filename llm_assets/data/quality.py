"""Quality filters: Gopher-style heuristics on a cleaned document's text.

``quality_signals`` measures a text (length, word lengths, symbols, repeated lines, words with
letters); ``quality_failures`` names the rules of ``QUALITY_RULES`` those signals fail under a
``CleanRecipe``. A document failing any rule is dropped.
"""

from __future__ import annotations

import re

from llm_assets.manifest import CleanRecipe

# From each letter to the end of its word: one match per word that holds a letter. Counted with
# subn, which builds no match objects; a letterless word is skipped without a match attempt.
_LETTER_TO_WORD_END = re.compile(r"[^\W\d_]\S*")
# The same count for ASCII text, 4x faster: delete every character that is neither a letter nor
# whitespace, and the words left are the words that held a letter. \x1c-\x1f separate words for
# str.split() but not for bytes.split(), so they become spaces.
_ASCII_SEPARATORS = b"\x1c\x1d\x1e\x1f"
_ASCII_SEPARATORS_TO_SPACE = bytes.maketrans(_ASCII_SEPARATORS, b" " * len(_ASCII_SEPARATORS))
_ASCII_NEITHER_LETTER_NOR_SPACE = bytes(c for c in range(128) if not chr(c).isalpha() and not chr(c).isspace())


def _words_with_letters(text: str) -> int:
    if text.isascii():
        letters_and_spaces = text.encode().translate(_ASCII_SEPARATORS_TO_SPACE, _ASCII_NEITHER_LETTER_NOR_SPACE)
        return len(letters_and_spaces.split())
    return _LETTER_TO_WORD_END.subn("", text)[1]


def quality_signals(text: str) -> dict[str, float]:
    """Gopher-style signals: chars, words (whitespace-separated), mean_word_length, symbol_ratio
    (('#' + '...' + '…') per word), duplicate_line_fraction (non-empty lines repeating an earlier
    line) and alpha_word_fraction (words holding a letter). Ratios over no words or lines are 0."""
    words = text.split()
    n_words = len(words)
    lines = [line for line in text.split("\n") if line.strip()]
    symbols = text.count("#") + text.count("...") + text.count("…")
    alpha_words = _words_with_letters(text)
    return {
        "chars": float(len(text)),
        "words": float(n_words),
        "mean_word_length": sum(map(len, words)) / n_words if n_words else 0.0,
        "symbol_ratio": symbols / n_words if n_words else 0.0,
        "duplicate_line_fraction": (len(lines) - len(set(lines))) / len(lines) if lines else 0.0,
        "alpha_word_fraction": alpha_words / n_words if n_words else 0.0,
    }


# Rule names in the order they are checked: a dropped document is counted under its first one.
QUALITY_RULES: tuple[str, ...] = (
    "too_short",
    "too_long",
    "mean_word_length_low",
    "mean_word_length_high",
    "symbol_ratio",
    "duplicate_line_fraction",
    "alpha_word_fraction",
)


def quality_failures(signals: dict[str, float], recipe: CleanRecipe) -> list[str]:
    """Names of the rules in QUALITY_RULES that ``signals`` fail under ``recipe``, in that order."""
    failed = {
        "too_short": signals["chars"] < recipe.min_chars,
        "too_long": signals["chars"] > recipe.max_chars,
        "mean_word_length_low": signals["mean_word_length"] < recipe.min_mean_word_length,
        "mean_word_length_high": signals["mean_word_length"] > recipe.max_mean_word_length,
        "symbol_ratio": signals["symbol_ratio"] > recipe.max_symbol_ratio,
        "duplicate_line_fraction": signals["duplicate_line_fraction"] > recipe.max_duplicate_line_fraction,
        "alpha_word_fraction": signals["alpha_word_fraction"] < recipe.min_alpha_word_fraction,
    }
    return [rule for rule in QUALITY_RULES if failed[rule]]
