"""Language identification of a document with lingua (its models ship in the wheel: offline).

A document is judged on its letters only: words of two or more letters, joined, from its first
``_SAMPLE_CHARS`` characters of them. Code then reads as its identifiers, comments and
docstrings; digits, operators and punctuation say nothing of a language. A document with fewer
than ``min_letters`` such characters is not judged (``UNDETERMINED``), nor is one whose best
language has a confidence below ``min_confidence``: neither is dropped for its language.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import cache

from lingua import IsoCode639_1, Language, LanguageDetector, LanguageDetectorBuilder

UNDETERMINED = "und"  # ISO 639-2's code for "undetermined"
# The detector chooses among the target languages and these, the most common languages of text
# on the web: a detector that knew only the targets would take every document for one of them.
_COMMON_LANGUAGES = ("en", "de", "fr", "es", "pt", "it", "nl", "ru", "zh", "ja", "ko", "ar", "pl", "tr", "sv",
                     "cs", "uk", "hi", "vi", "id")
# lingua's confidence is settled long before this many letters; more only costs time.
_SAMPLE_CHARS = 1000
_WORD = re.compile(r"[^\W\d_]{2,}")


def checked_languages(codes: Iterable[str]) -> tuple[str, ...]:
    """``codes`` as a tuple of lower-case ISO 639-1 codes; a ValueError names the unknown ones."""
    codes = tuple(code.lower() for code in codes)
    unknown = [code for code in codes if not hasattr(IsoCode639_1, code.upper())]
    if unknown:
        raise ValueError(f"stages.clean.languages: unknown ISO 639-1 codes {unknown}; use codes such as 'en', 'de'")
    return codes


@cache
def language_detector(targets: tuple[str, ...]) -> LanguageDetector:
    """One detector per set of target languages, built once per process. Low-accuracy mode: it
    judges on trigrams only, 10-15% faster on the standard library, with the same verdicts on
    documents of 200+ letters (the minimum judged by default)."""
    codes = sorted(set(checked_languages(targets)) | set(_COMMON_LANGUAGES))
    languages = [Language.from_iso_code_639_1(getattr(IsoCode639_1, code.upper())) for code in codes]
    return LanguageDetectorBuilder.from_languages(*languages).with_low_accuracy_mode().build()


def identify_language(text: str, targets: tuple[str, ...], min_letters: int, min_confidence: float) -> str:
    """The ISO 639-1 code of ``text``'s language, or UNDETERMINED when there are fewer than
    ``min_letters`` letters to judge or the best guess is less sure than ``min_confidence``."""
    letters = " ".join(_WORD.findall(text, 0, _SAMPLE_CHARS * 4))[:_SAMPLE_CHARS]
    if sum(c.isalpha() for c in letters) < min_letters:
        return UNDETERMINED
    best = language_detector(targets).compute_language_confidence_values(letters)[0]
    return best.language.iso_code_639_1.name.lower() if best.value >= min_confidence else UNDETERMINED
