"""Unicode normalisation of a document's text: one normal form, one kind of line break.

``normalize_text``: Unicode normal form (NFKC by default), ``\\n`` newlines, no control or
zero-width characters, no trailing whitespace. U+FFFD is kept: it marks bytes that were not valid
UTF-8 upstream, and is counted in the statistics rather than hidden.
"""

from __future__ import annotations

import re
import unicodedata

# Every line break Python knows (CR, CRLF, NEL, LS, PS) becomes "\n", so lines mean the same to
# every later stage.
_LINE_BREAKS = re.compile(r"\r\n?|[\x85\u2028\u2029]")
# C0/C1 control characters except \t and \n, and the invisible zero-width characters that split
# words and defeat exact-match dedup. U+FFFD is deliberately not here.
_INVISIBLE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x84\x86-\x9f\u200b-\u200d\u2060\ufeff]+")
# Any character either of the two above would change: most documents have none, and one search
# for them is cheaper than the two substitutions.
_LINE_BREAK_OR_INVISIBLE = re.compile(r"[\r\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200d\u2028\u2029\u2060\ufeff]")


def normalize_text(text: str, form: str = "NFKC") -> str:
    """Unicode normal form ``form`` (NFC or NFKC), "\\n" newlines, no control or zero-width
    characters (\\t kept), no trailing whitespace on any line. U+FFFD is kept."""
    if _LINE_BREAK_OR_INVISIBLE.search(text):
        text = _INVISIBLE.sub("", _LINE_BREAKS.sub("\n", text))
    # Normalise after removal: a zero-width joiner between a letter and a combining mark would
    # otherwise block their composition. normalize() returns quickly on already-normal text.
    text = unicodedata.normalize(form, text)
    return "\n".join(line.rstrip() for line in text.split("\n"))
