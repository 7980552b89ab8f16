"""Cleaning of one corpus shard: pure functions over a raw shard frame, no Dagster.

Each document goes through four steps, in this order:

1. ``html_to_text`` (only for ``kind == "html"``): the stdlib ``html.parser`` keeps the visible
   text, drops scripts, styles and page boilerplate (nav, header, footer, ...), turns block
   elements into line breaks. The document's kind becomes ``"text"``.
2. ``normalize_text``: Unicode normal form (NFKC by default), ``\\n`` newlines, no control or
   zero-width characters, no trailing whitespace. U+FFFD is kept: it marks bytes that were not
   valid UTF-8 upstream, and is counted in the statistics rather than hidden.
3. ``redact_pii``: each detected email, phone number, IP address, payment card number and API
   key becomes a typed placeholder (``<EMAIL>``...). The detectors are tuned for precision on
   Python source and docstrings, which are most of the corpus: version numbers, dates, hex
   constants, slices, UUIDs and long integers are not PII.
4. ``quality_signals`` / ``quality_failures``: Gopher-style heuristics on the cleaned text; a
   document failing any rule is dropped.

``clean_frame`` runs the steps over a frame and returns the kept documents (same columns, text
and sha256 replaced, plus ``pii_redactions``) with a ``CleanStats``. ``scan_pii_frame`` runs the
same detectors over a cleaned frame: the residual scan behind a blocking check.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from html.parser import HTMLParser

import polars as pl

from llm_assets.manifest import PII_KINDS, CleanRecipe

# --------------------------------------------------------------------------------------------
# HTML to text
# --------------------------------------------------------------------------------------------

# Content that is never visible text (script, style...) or is page chrome repeated on every page
# of a site (nav, header, footer...): it would only add near-duplicate noise to the corpus.
_DROPPED_ELEMENTS = frozenset(
    {
        "script", "style", "noscript", "template", "svg", "head", "title",
        "nav", "header", "footer", "aside", "form",
    }
)
# Elements after which text continues on a new paragraph (a blank line) or a new line.
_PARAGRAPH_ELEMENTS = frozenset(
    {
        "p", "div", "section", "article", "main", "blockquote", "pre", "table", "ul", "ol", "dl",
        "h1", "h2", "h3", "h4", "h5", "h6", "figure", "figcaption", "details", "summary", "hr",
        "address", "fieldset",
    }
)
_LINE_ELEMENTS = frozenset({"br", "li", "tr", "dt", "dd", "caption", "option"})
# Table cells sit side by side: a space keeps "a</td><td>b" from becoming "ab".
_CELL_ELEMENTS = frozenset({"td", "th"})
_HTML_SPACE = re.compile(r"\s+")


class _TextExtractor(HTMLParser):
    """Collects visible text; block boundaries become pending line breaks, emitted lazily so
    that nested or empty blocks never pile up blank lines."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)  # entities arrive already unescaped
        self.parts: list[str] = []
        self.dropped: list[str] = []  # open elements whose content is dropped, innermost last
        self.pre_depth = 0
        self.pending_breaks = 0  # 0: none, 1: new line, 2: new paragraph
        self.space_pending = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _DROPPED_ELEMENTS:
            self.dropped.append(tag)
        elif tag == "body":
            self.dropped.clear()  # "</head>" is optional in HTML: the body starts visible text
        elif not self.dropped:
            self._boundary(tag)
            if tag == "pre":
                self.pre_depth += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in self.dropped:
            # Close the element and anything left unclosed inside it ("<form><svg></form>").
            while self.dropped.pop() != tag:
                pass
        elif tag in ("body", "html"):
            self.dropped.clear()  # an unclosed <nav> must not swallow text past the page's end
        elif not self.dropped:
            self._boundary(tag)
            if tag == "pre" and self.pre_depth:
                self.pre_depth -= 1

    def handle_data(self, data: str) -> None:
        if self.dropped:
            return
        if self.pre_depth:
            self._emit(data.replace("\r\n", "\n"))
            return
        # Outside <pre>, any run of whitespace (source newlines included) renders as one space.
        collapsed = _HTML_SPACE.sub(" ", data)
        if collapsed.startswith(" "):
            self.space_pending = True
        if collapsed.strip():
            self._emit(collapsed.strip())
            self.space_pending = collapsed.endswith(" ")

    def parse_marked_section(self, i: int, report: int = 1) -> int:
        # The stdlib asserts on marked sections it does not know (IE's "<![if !IE]>", "<![ x"):
        # skip them up to the next ">", as browsers do.
        try:
            return super().parse_marked_section(i, report)
        except AssertionError:
            end = self.rawdata.find(">", i)
            return -1 if end < 0 else end + 1

    def _boundary(self, tag: str) -> None:
        if tag in _PARAGRAPH_ELEMENTS:
            self.pending_breaks = 2
        elif tag in _LINE_ELEMENTS:
            self.pending_breaks = max(self.pending_breaks, 1)
        elif tag in _CELL_ELEMENTS:
            self.space_pending = True

    def _emit(self, text: str) -> None:
        if self.parts:
            if self.pending_breaks:
                self.parts.append("\n" * self.pending_breaks)
            elif self.space_pending:
                self.parts.append(" ")
        self.pending_breaks = 0
        self.space_pending = False
        self.parts.append(text)


def html_to_text(html: str) -> str:
    """The visible text of an HTML document, one block per line, paragraphs apart by one blank line.

    Never raises: malformed markup (unclosed or stray tags, garbage) yields whatever text can be
    recovered.
    """
    parser = _TextExtractor()
    try:
        parser.feed(html)
        parser.close()
    except Exception:  # noqa: BLE001 - a parser bug must not fail a shard; keep what was read
        pass
    lines = [line.rstrip() for line in "".join(parser.parts).split("\n")]
    kept: list[str] = []
    for line in lines:
        if line or (kept and kept[-1]):  # at most one blank line in a row
            kept.append(line)
    return "\n".join(kept).strip("\n")


# --------------------------------------------------------------------------------------------
# Unicode normalisation
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# PII detection and redaction
# --------------------------------------------------------------------------------------------

PLACEHOLDERS: dict[str, str] = {
    "email": "<EMAIL>",
    "phone": "<PHONE>",
    "ip_address": "<IP_ADDRESS>",
    "credit_card": "<CREDIT_CARD>",
    "api_key": "<API_KEY>",
}


# Most patterns below start with a plain character or character class and check the character
# before the match with a lookbehind placed after that first character, as in
# r"\d(?<![\w.]\d)...": "the digit that starts the match follows no word character or dot". A
# pattern that opens with the lookbehind itself means the same, but the regex engine then tries a
# match at every position instead of skipping to candidate first characters: 3 to 4 times slower
# on source code. Patterns that would still be slow get a cheap `hint`, a test that must pass for
# the pattern to run at all.


@dataclass(frozen=True)
class _Detector:
    """One pattern of one PII kind. The part of a match that is PII is its "pii" group when the
    pattern has one, else the whole match: "api_key = '...'" loses its value, not its name."""

    kind: str
    pattern: re.Pattern[str]
    # Called on each candidate; False leaves it in the text (Luhn, octet ranges, entropy...).
    accept: Callable[[re.Match[str]], bool] = lambda match: True
    # Called on the whole text first; False skips the pattern (a cheap test for a slow pattern).
    hint: Callable[[str], bool] = lambda text: True


def _vendor_key(match: re.Match[str]) -> bool:
    # The token must start a word ("disk-..." holds no "sk-" key) and hold a digit, like every
    # randomly generated token does; a prose word with a key-like prefix does not.
    before = match.string[match.start() - 1] if match.start() else " "
    return not (before.isalnum() or before in "_-") and any(c.isdigit() for c in match.group())


def _shannon_entropy(value: str) -> float:
    n = len(value)
    return -sum(c / n * math.log2(c / n) for c in Counter(value).values())


def _looks_random(value: str) -> bool:
    """A secret, not an identifier or a word: high entropy, letters and digits mixed."""
    has_digit = any(c.isdigit() for c in value)
    has_letter = any(c.isalpha() for c in value)
    return has_digit and has_letter and _shannon_entropy(value) >= 3.5


# API keys: well-known token formats, each with a prefix specific enough on its own.
_VENDOR_KEY = re.compile(
    r"AKIA[A-Z0-9]{16}|ASIA[A-Z0-9]{16}"  # AWS access key id
    r"|gh[pousr]_[A-Za-z0-9]{36}|github_pat_\w{22,}"  # GitHub
    r"|xox[abposr]-[A-Za-z0-9-]{10,}"  # Slack
    r"|sk-(?:proj-|svcacct-|admin-)?[\w-]{20,}"  # OpenAI-style
    r"|AIza[\w-]{35}"  # Google API key
    r"|sk_live_\w{10,}|rk_live_\w{10,}|sk_test_\w{10,}|rk_test_\w{10,}"  # Stripe secret keys
    r"|eyJ[\w-]{8,}\.eyJ[\w-]{8,}\.[\w-]*"  # JWT: base64url of '{"' twice, then the signature
    r"(?![\w-])"
)
# The pattern's first characters (A, g, x, s, r, e) are everywhere; a substring test for each
# prefix finds the rare documents worth searching.
_VENDOR_PREFIXES = (
    "AKIA", "ASIA", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_", "xox", "sk-", "AIza",
    "sk_live_", "rk_live_", "sk_test_", "rk_test_", "eyJ",
)
# Assignments of a secret-named variable or field ("api_key = ...", "secret='...'", "token: ...",
# '"password": "..."'); only a value of 20+ characters that looks random counts, so code such as
# "token = tokenize.generate_tokens(...)" and "api_key = 'changeme'" are left alone. Unquoted
# values followed by "(" or "[" are calls and subscripts.
_SECRET_ASSIGNMENT = re.compile(
    r"(?i)(?:api[_-]?key|secret|token|passw(?:or)?d|private[_-]?key|access[_-]?key)[\w-]*[\"']?"
    r"\s*[:=]\s*(?P<quote>[\"']?)(?P<pii>[\w+/=.~-]{20,})(?P=quote)(?![\w+/=.~(\[-])"
)
# The case-insensitive search above is the slowest of all; the same shape, case-sensitive, over
# the lower-cased text first tells whether a document has any candidate at all.
_SECRET_ASSIGNMENT_HINT = re.compile(r"(?:key|secret|token|passw)[\w-]*[\"']?\s*[:=]\s*[\"']?[\w+/=.~-]{20}")

# Email: local@domain.tld with a letters-only TLD of 2+ characters. "user@localhost" is not an
# email here: without a dotted domain it is not routable on the Internet and, in code, it names a
# placeholder account, not a person. Not followed by "(": "a@b.sum()" is a matrix product.
_EMAIL = re.compile(
    r"[A-Za-z0-9](?<![\w.%+-][A-Za-z0-9])(?:[\w.%+-]{0,62}[\w%+-])?"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w(-])"
)
_EMAIL_HINT = re.compile(r"@(?<=[\w%+-]@)[A-Za-z0-9]")  # a decorator's "@" follows a space


# Payment cards: 13 to 19 digits, contiguous or in groups of four split by the same single space
# or dash (16 digits as 4-4-4-4, 19 as 4-4-4-4-3), or American Express / Diners grouping 4-6-5 and
# 4-6-4. The first digit is 2-6, the major industry identifiers of card networks; a Luhn check on
# the candidates then removes nine in ten random numbers.
_CARD_GROUPED = re.compile(
    r"[2-6](?<![\w.+-][2-6])\d{3}(?P<sep>[ -]?)\d{4}(?P=sep)\d{4}(?P=sep)\d{1,4}(?:(?P=sep)\d{1,3})?"
    r"(?![\w-]|[.,]\d)"
)
_CARD_AMEX = re.compile(r"3(?<![\w.+-]3)\d{3}(?P<sep>[ -]?)\d{6}(?P=sep)\d{4,5}(?![\w-]|[.,]\d)")


def _luhn_valid(match: re.Match[str]) -> bool:
    digits = [int(c) for c in match.group() if c.isdigit()]
    if not 13 <= len(digits) <= 19 or len(set(digits)) == 1:  # 0000 0000 0000 0000 passes Luhn
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


# IPv4: four dot-separated numbers, not inside a longer dotted number or name ("1.2.3.4.5",
# "section-7.1.1.1", "1.0.0.127.in-addr.arpa"); octet ranges and leading zeros are checked by the
# ipaddress module.
_IPV4 = re.compile(r"\d(?<![\w.-]\d)\d{0,2}\.\d{1,3}\.\d{1,3}\.\d{1,3}(?!\w|\.\w)")
_IPV4_HINT = re.compile(r"\.\d{1,3}\.\d{1,3}\.")  # starts with a literal: skips to dots
# "section 8.2.4.44", "version 2.7.2.2": numbered things, not hosts.
_NUMBERING_WORD = re.compile(r"(?i)(?:version|section|release)s?\W{0,2}$")
# 0.0.0.0/8 means "this network": never a host's address (RFC 1122).
_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")
# IPv6 candidates: hex groups and colons, full ("2001:0db8:0:0:0:0:0:1") or compressed
# ("2001:db8::1"); the ipaddress module validates them. An embedded IPv4 tail is left to _IPV4.
_IPV6 = re.compile(r"[0-9A-Fa-f:](?<![\w:.][0-9A-Fa-f:])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:]|\.\d)")
_IPV6_HINT = re.compile(r":[0-9A-Fa-f]{0,4}:")  # "::" or two colons around one hex group


_CIDR_SUFFIX = re.compile(r"/\d")


def _is_network(match: re.Match[str]) -> bool:
    """'100.64.0.0/10' names a network in CIDR notation, not any host's address."""
    return _CIDR_SUFFIX.match(match.string, match.end()) is not None


def _public_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    # Loopback, unspecified, multicast and reserved addresses (these include 255.255.255.255 and
    # netmasks like 255.255.255.0) are all over networking code and can never identify a host.
    return not (address.is_loopback or address.is_unspecified or address.is_multicast or address.is_reserved)


def _valid_ipv4(match: re.Match[str]) -> bool:
    try:
        address = ipaddress.IPv4Address(match.group())
    except ValueError:
        return False
    # Four single digits ("3.1.1.6", "7.1.1.1") are version or section numbers far more often
    # than hosts; the few hosts of that shape (1.1.1.1, 8.8.8.8) are public resolvers, not people.
    if max(address.packed) < 10 or address in _THIS_NETWORK or _is_network(match):
        return False
    before = match.string[max(0, match.start() - 12) : match.start()]
    return _public_address(address) and _NUMBERING_WORD.search(before) is None


def _valid_ipv6(match: re.Match[str]) -> bool:
    # A valid address that code would never spell as anything else: at least 3 groups, one of them
    # with 2+ characters including a digit. That leaves out slices ("x[10::20]", "a[::2]"),
    # times ("12:30:45" is no address anyway), and "a::b" or "dead::beef".
    text = match.group()
    groups = [g for g in text.split(":") if g]
    if _is_network(match) or len(groups) < 3 or not any(len(g) >= 2 and any(c.isdigit() for c in g) for g in groups):
        return False
    try:
        return _public_address(ipaddress.IPv6Address(text))
    except ValueError:
        return False


# Phone numbers need a leading "+" or a phone-like grouping with separators, so that bare digit
# runs in code (x = 1234567890) and dates (2024-01-15) are never phones. The total digit count
# (7 to 15, the E.164 maximum) is checked afterwards.
_PHONE_INTERNATIONAL = re.compile(
    # +CC (country codes never start with 0: "+000000120" is a format example) then digits
    # without separators ("+14155552671"), or groups split by a space, dot or dash,
    # optionally after an area or trunk code in parentheses ("+1 (555) 123-4567",
    # "+44 20 7946 0958", "+44 (0)20 7946 0958").
    r"\+(?<![\w+]\+)[1-9]\d{0,2}(?:\d{4,12}|(?:[ .-]?\(\d{1,4}\) ?\d{1,5})?(?:[ .-]\d{1,5}){1,5})(?!\w|[.-]?\d)"
)
# An area code in parentheses, "(555) 123-4567" or "(020) 7946 0958"; not a call "f(555) ...".
_PHONE_AREA_CODE = re.compile(r"\((?<![\w)\]]\()\d{2,5}\) ?\d{3,4}[ .-]?\d{4}(?!\w|[.-]?\d)")
# North American 3-3-4 with the same separator twice: "555-123-4567", "555.123.4567".
_PHONE_NORTH_AMERICAN = re.compile(r"\d(?<![\w.+-]\d)\d{2}(?P<sep>[.-])\d{3}(?P=sep)\d{4}(?!\w|[.-]?\d)")


def _phone_digits(match: re.Match[str]) -> bool:
    return 7 <= sum(c.isdigit() for c in match.group()) <= 15


# Detectors run in this order, each over the text already redacted by the ones before: secrets
# first (a token holds digit runs and dots that later detectors would take for a phone number, a
# card or an address), then emails (domains hold dots and digits), then the number-shaped kinds,
# most specific first. A match is replaced whole, so two kinds never share characters, and no
# placeholder ("<PHONE>": capitals, "_", "<>") can be taken for PII by a later detector.
_DETECTORS: tuple[_Detector, ...] = (
    _Detector(
        "api_key", _VENDOR_KEY, accept=_vendor_key, hint=lambda text: any(p in text for p in _VENDOR_PREFIXES)
    ),
    _Detector(
        "api_key",
        _SECRET_ASSIGNMENT,
        accept=lambda m: _looks_random(m.group("pii")),
        hint=lambda text: _SECRET_ASSIGNMENT_HINT.search(text.lower()) is not None,
    ),
    _Detector("email", _EMAIL, hint=lambda text: _EMAIL_HINT.search(text) is not None),
    _Detector("credit_card", _CARD_GROUPED, accept=_luhn_valid),
    _Detector("credit_card", _CARD_AMEX, accept=_luhn_valid),
    _Detector("ip_address", _IPV6, accept=_valid_ipv6, hint=lambda text: _IPV6_HINT.search(text) is not None),
    _Detector("ip_address", _IPV4, accept=_valid_ipv4, hint=lambda text: _IPV4_HINT.search(text) is not None),
    _Detector("phone", _PHONE_INTERNATIONAL, accept=_phone_digits, hint=lambda text: "+" in text),
    _Detector("phone", _PHONE_AREA_CODE, accept=_phone_digits),
    _Detector("phone", _PHONE_NORTH_AMERICAN, accept=_phone_digits),
)


def _checked_kinds(kinds: Iterable[str]) -> tuple[str, ...]:
    kinds = tuple(kinds)
    unknown = sorted(set(kinds) - set(PII_KINDS))
    if unknown:
        raise ValueError(f"unknown PII kinds {unknown}; known: {list(PII_KINDS)}")
    return kinds


def _substitute(detector: _Detector, text: str, detections: list[str]) -> str:
    placeholder = PLACEHOLDERS[detector.kind]
    has_pii_group = "pii" in detector.pattern.groupindex

    def replace(match: re.Match[str]) -> str:
        if not detector.accept(match):
            return match.group()
        start, end = match.span("pii") if has_pii_group else match.span()
        detections.append(text[start:end])
        return text[match.start() : start] + placeholder + text[end : match.end()]

    return detector.pattern.sub(replace, text)


def _redact(text: str, kinds: tuple[str, ...]) -> tuple[str, dict[str, list[str]]]:
    """The text with every detection of ``kinds`` replaced, and the detections per kind."""
    found: dict[str, list[str]] = {kind: [] for kind in kinds}
    for detector in _DETECTORS:
        if detector.kind in found and detector.hint(text):
            text = _substitute(detector, text, found[detector.kind])
    return text, found


def redact_pii(text: str, kinds: Iterable[str]) -> tuple[str, dict[str, int]]:
    """Replace every PII detection of ``kinds`` by its placeholder; returns the text and the
    number of replacements per kind. Idempotent: placeholders are never detected."""
    redacted, found = _redact(text, _checked_kinds(kinds))
    return redacted, {kind: len(matches) for kind, matches in found.items()}


def find_pii(text: str, kinds: Iterable[str] = PII_KINDS) -> dict[str, list[str]]:
    """The PII detections of ``kinds`` in ``text``, per kind: exactly what ``redact_pii`` replaces."""
    return _redact(text, _checked_kinds(kinds))[1]


# --------------------------------------------------------------------------------------------
# Quality heuristics
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# One shard
# --------------------------------------------------------------------------------------------


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
    redact = _checked_kinds(recipe.redact)
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
        text, found = _redact(text, redact)
        failures = quality_failures(quality_signals(text), recipe)
        keep.append(not failures)
        if failures:
            stats.dropped_by_reason[failures[0]] += 1
            continue
        for pii_kind, matches in found.items():
            stats.pii_redacted[pii_kind] += len(matches)
        texts.append(text)
        kinds.append(kind)
        redactions.append(sum(len(matches) for matches in found.values()))
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


def scan_pii_frame(frame: pl.DataFrame, kinds: Iterable[str] = PII_KINDS) -> dict[str, int]:
    """Residual scan: PII detections per kind over the frame's text column. All kinds by default,
    whatever a recipe redacted, so a check requiring all zeros fails on a partial recipe."""
    kinds = _checked_kinds(kinds)
    counts = dict.fromkeys(kinds, 0)
    for text in frame["text"].to_list():
        for kind, matches in _redact(text or "", kinds)[1].items():
            counts[kind] += len(matches)
    return counts
