"""PII detection and redaction: the detectors, their placeholders, and the residual scan.

``redact_pii`` replaces each detected email, phone number, IP address, payment card number and API
key by a typed placeholder (``<EMAIL>``...). The detectors are tuned for precision on Python
source and docstrings, which are most of the corpus: version numbers, dates, hex constants,
slices, UUIDs and long integers are not PII. ``find_pii`` returns what ``redact_pii`` would
replace, and ``scan_pii_frame`` runs the same detectors over a cleaned frame: the residual scan
behind a blocking check.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import polars as pl

from llm_assets.manifest import PII_KINDS

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


def checked_pii_kinds(kinds: Iterable[str]) -> tuple[str, ...]:
    """``kinds`` as a tuple; a ValueError names any kind that is not in PII_KINDS."""
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
    redacted, found = _redact(text, checked_pii_kinds(kinds))
    return redacted, {kind: len(matches) for kind, matches in found.items()}


def find_pii(text: str, kinds: Iterable[str] = PII_KINDS) -> dict[str, list[str]]:
    """The PII detections of ``kinds`` in ``text``, per kind: exactly what ``redact_pii`` replaces."""
    return _redact(text, checked_pii_kinds(kinds))[1]


def scan_pii_frame(frame: pl.DataFrame, kinds: Iterable[str] = PII_KINDS) -> dict[str, int]:
    """Residual scan: PII detections per kind over the frame's text column. All kinds by default,
    whatever a recipe redacted, so a check requiring all zeros fails on a partial recipe."""
    kinds = checked_pii_kinds(kinds)
    counts = dict.fromkeys(kinds, 0)
    for text in frame["text"].to_list():
        for kind, matches in _redact(text or "", kinds)[1].items():
            counts[kind] += len(matches)
    return counts
