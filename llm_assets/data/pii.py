"""PII redaction: maintained detectors find PII, ``redact_pii`` replaces it by typed placeholders.

Each kind is found by the library that knows it best, with a thin candidate pattern only where the
library has no finder of its own or its finder is too loose for source code:

- ``api_key``: detect-secrets plugins (AWS, GitHub, GitLab, Slack, Stripe, OpenAI, JWT, npm, PyPI,
  SendGrid, Twilio, Discord, Telegram, Mailchimp, Square, Azure storage, credentials inside URLs,
  private-key headers, whose whole PEM block goes) and its keyword detector for values assigned to
  secret-named fields;
- ``email``: a strict address pattern, also in its obfuscated spellings ("jane [at] example [dot]
  org"), kept only when tldextract finds a public suffix ("backup@2x.png" is a file name);
- ``credit_card``: 13-19 digits in the groupings card networks print, Luhn-valid;
- ``ip_address``: dotted quads and IPv6 validated by ``ipaddress``, minus what identifies no host
  (loopback, reserved, networks in CIDR) and minus numbering: versions ("dpkg (1.16.4.3)",
  "version 2.7.2.2", ">= 1.2.3.4"), sections and clauses;
- ``phone``: phone-shaped candidates (a "+" country code, an area code in parentheses, North
  American 3-3-4, a national trunk "0" and groups) judged by ``phonenumbers`` for the manifest's
  regions: bare digit runs in code (``x = 2147483647``) are integers, never candidates.

``identifying_address`` and ``routable_email`` are the policy of what is and is not PII; the
independent residual scan (:mod:`llm_assets.data.residual_pii`) applies the same policy to its own
detectors, so both judge the same look-alikes the same way.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cache

import phonenumbers
import tldextract
from detect_secrets.filters.heuristic import is_potential_uuid, is_sequential_string, is_templated_secret
from detect_secrets.plugins.aws import AWSKeyDetector
from detect_secrets.plugins.azure_storage_key import AzureStorageKeyDetector
from detect_secrets.plugins.base import RegexBasedDetector
from detect_secrets.plugins.basic_auth import BasicAuthDetector
from detect_secrets.plugins.discord import DiscordBotTokenDetector
from detect_secrets.plugins.github_token import GitHubTokenDetector
from detect_secrets.plugins.gitlab_token import GitLabTokenDetector
from detect_secrets.plugins.jwt import JwtTokenDetector
from detect_secrets.plugins.keyword import CONFIG_DENYLIST_REGEX_TO_GROUP, DENYLIST, KeywordDetector
from detect_secrets.plugins.mailchimp import MailchimpDetector
from detect_secrets.plugins.npm import NpmDetector
from detect_secrets.plugins.openai import OpenAIDetector
from detect_secrets.plugins.private_key import PrivateKeyDetector
from detect_secrets.plugins.pypi_token import PypiTokenDetector
from detect_secrets.plugins.sendgrid import SendGridDetector
from detect_secrets.plugins.slack import SlackDetector
from detect_secrets.plugins.square_oauth import SquareOAuthDetector
from detect_secrets.plugins.stripe import StripeDetector
from detect_secrets.plugins.telegram_token import TelegramBotTokenDetector
from detect_secrets.plugins.twilio import TwilioKeyDetector

from llm_assets.manifest import PII_KINDS

PLACEHOLDERS: dict[str, str] = {
    "email": "<EMAIL>",
    "phone": "<PHONE>",
    "ip_address": "<IP_ADDRESS>",
    "credit_card": "<CREDIT_CARD>",
    "api_key": "<API_KEY>",
}
DEFAULT_PHONE_REGIONS: tuple[str, ...] = ("US", "GB", "DE", "FR", "JP")


def checked_pii_kinds(kinds: Iterable[str]) -> tuple[str, ...]:
    """``kinds`` as a tuple; a ValueError names any kind that is not in PII_KINDS."""
    kinds = tuple(kinds)
    unknown = sorted(set(kinds) - set(PII_KINDS))
    if unknown:
        raise ValueError(f"unknown PII kinds {unknown}; known: {list(PII_KINDS)}")
    return kinds


def checked_phone_regions(regions: Iterable[str]) -> tuple[str, ...]:
    """``regions`` as a tuple; a ValueError names any region phonenumbers does not know."""
    regions = tuple(regions)
    unknown = sorted(set(regions) - phonenumbers.SUPPORTED_REGIONS)
    if unknown:
        raise ValueError(
            f"stages.clean.phone_regions: unknown regions {unknown}; use ISO 3166-1 alpha-2 codes such as 'US', 'DE'"
        )
    return regions


# --- the policy: what is not PII even though it looks like it ------------------------------------

# The bundled Public Suffix List snapshot: the default extractor would fetch the list over the
# network first, which a cluster without Internet access waits on.
_DOMAINS = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)


def routable_email(address: str) -> bool:
    """The domain ends in a public suffix: "jane@example.org" is an address, "backup@2x.png" and
    "user@host.local" are not."""
    return _DOMAINS(address.rsplit("@", 1)[-1]).suffix != ""


# Words after which a dotted number is a numbered thing, not a host ("section 8.2.4.44", "dpkg
# (>= 1.16.4.3)", "§ 4.2.1.3"). A package name then "(" is a Debian/RPM-style version unless the
# word names a host ("server (203.0.113.7)").
_NUMBERING_BEFORE = re.compile(
    r"(?i)(?:\b(?:versions?|releases?|sections?|clauses?|rev(?:ision)?|build|patch|ver|v)\W{0,2}|§\s?|[<>=~^]=?\s?)$"
)
_PACKAGE_PAREN_BEFORE = re.compile(r"([A-Za-z][\w.+-]*) \($")
_HOST_WORDS = frozenset({"host", "hostname", "ip", "address", "addr", "server", "client", "peer", "gateway", "from"})
# Debian revisions and build suffixes after a version: "1.16.4.3-1ubuntu2", "2.3.4.5~rc1", "1.2.3.4+dfsg".
_VERSION_SUFFIX_AFTER = re.compile(r"[-~+:][0-9A-Za-z]")
_CIDR_SUFFIX = re.compile(r"/\d")
_LONGER_NAME_AFTER = re.compile(r"\.\w")  # "1.0.0.127.in-addr.arpa", "1.2.3.4.5": part of a longer name
# 0.0.0.0/8 means "this network": never a host's address (RFC 1122).
_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")


def _numbering(text: str, start: int, end: int) -> bool:
    before = text[max(0, start - 40) : start]
    if _NUMBERING_BEFORE.search(before) or _VERSION_SUFFIX_AFTER.match(text, end):
        return True
    package = _PACKAGE_PAREN_BEFORE.search(before)
    return package is not None and package.group(1).lower() not in _HOST_WORDS


def identifying_address(text: str, start: int, end: int) -> bool:
    """``text[start:end]`` is an IP address that can identify a host: valid, not a CIDR network,
    not loopback, unspecified, multicast or reserved, not a version or section number."""
    candidate = text[start:end]
    try:
        address = ipaddress.ip_address(candidate)
    except ValueError:
        return False
    not_a_host = address.is_loopback or address.is_unspecified or address.is_multicast or address.is_reserved
    if not_a_host or _CIDR_SUFFIX.match(text, end) or _LONGER_NAME_AFTER.match(text, end):
        return False
    if address.version == 6:
        # Code spells slices and times with colons ("x[10::20]"); an address worth redacting has 3+
        # groups, one of 2+ characters holding a digit.
        groups = [g for g in candidate.split(":") if g]
        return len(groups) >= 3 and any(len(g) >= 2 and any(c.isdigit() for c in g) for g in groups)
    # Four single digits ("3.1.1.6") are version or section numbers far more often than hosts;
    # the few hosts of that shape (1.1.1.1, 8.8.8.8) are public resolvers, not people.
    return max(address.packed) >= 10 and address not in _THIS_NETWORK and not _numbering(text, start, end)


# --- candidates and their validation ------------------------------------------------------------


@dataclass(frozen=True)
class _Pattern:
    """Candidates of one PII kind, each kept when ``accept(text, start, end)`` says so. The PII is
    the "pii" group of a match when the pattern has one, else the whole match."""

    kind: str
    pattern: re.Pattern[str]
    accept: Callable[[str, int, int], bool]
    # Called on the whole text first; False skips the pattern (a cheap test for a slow pattern).
    hint: Callable[[str], bool] = lambda text: True


def _luhn_valid(text: str, start: int, end: int) -> bool:
    digits = [int(c) for c in text[start:end] if c.isdigit()]
    if not 13 <= len(digits) <= 19 or len(set(digits)) == 1:  # 0000 0000 0000 0000 passes Luhn
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _possible_phone(regions: tuple[str, ...], valid: bool) -> Callable[[str, int, int], bool]:
    """phonenumbers' judgement of a candidate: a "+" number on its own country code, a national one
    in any of ``regions``; ``valid`` asks for a number in an allocated range, not just a plausible
    length (for the loosest shape, a trunk "0" and groups)."""
    check = phonenumbers.is_valid_number if valid else phonenumbers.is_possible_number

    def accept(text: str, start: int, end: int) -> bool:
        candidate = text[start:end]
        for region in (None,) if candidate.startswith("+") else regions:
            try:
                if check(phonenumbers.parse(candidate, region)):
                    return True
            except phonenumbers.NumberParseException:
                continue
        return False

    return accept


# Email: local@domain.tld, not inside a longer word, not followed by "(": "a@b.sum()" is a matrix
# product. Obfuscated: "jane [at] example [dot] org", "jane(at)example.org".
_EMAIL = re.compile(
    r"[A-Za-z0-9](?<![\w.%+-][A-Za-z0-9])(?:[\w.%+-]{0,62}[\w%+-])?"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w(-])"
)
_EMAIL_HINT = re.compile(r"@(?<=[\w%+-]@)[A-Za-z0-9]")  # a decorator's "@" follows a space
_AT = r"\s?[\[({<]\s?(?i:at)\s?[\])}>]\s?"
_DOT = r"(?:\.|\s?[\[({<]\s?(?i:dot)\s?[\])}>]\s?)"
_OBFUSCATED_EMAIL = re.compile(
    rf"[A-Za-z0-9](?<![\w.%+-][A-Za-z0-9])[\w.%+-]{{0,63}}{_AT}[A-Za-z0-9-]{{1,63}}(?:{_DOT}[A-Za-z0-9-]{{1,63}})+"
)
_OBFUSCATED_HINT = re.compile(r"(?i)[\[({<]\s?at\s?[\])}>]")
_OBFUSCATION = re.compile(rf"{_AT}|{_DOT}")


def _routable_obfuscated(text: str, start: int, end: int) -> bool:
    return routable_email(_OBFUSCATION.sub(lambda m: "@" if "t" in m.group().lower() else ".", text[start:end]))


# Payment cards: 16 digits as 4-4-4-4 (or contiguous), 19 as 4-4-4-4-3, American Express / Diners
# 4-6-5 and 4-6-4, always with one separator throughout. First digit 2-6: the card networks.
_CARD_GROUPED = re.compile(
    r"[2-6](?<![\w.+-][2-6])\d{3}(?P<sep>[ -]?)\d{4}(?P=sep)\d{4}(?P=sep)\d{1,4}(?:(?P=sep)\d{1,3})?"
    r"(?![\w-]|[.,]\d)"
)
_CARD_AMEX = re.compile(r"3(?<![\w.+-]3)\d{3}(?P<sep>[ -]?)\d{6}(?P=sep)\d{4,5}(?![\w-]|[.,]\d)")

# IPv4 not inside a longer dotted number or name ("1.2.3.4.5", "1.0.0.127.in-addr.arpa").
_IPV4 = re.compile(r"\d(?<![\w.-]\d)\d{0,2}\.\d{1,3}\.\d{1,3}\.\d{1,3}(?!\w|\.\w)")
_IPV4_HINT = re.compile(r"\.\d{1,3}\.\d{1,3}\.")
_IPV6 = re.compile(r"[0-9A-Fa-f:](?<![\w:.][0-9A-Fa-f:])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:]|\.\d)")
_IPV6_HINT = re.compile(r":[0-9A-Fa-f]{0,4}:")

# Phone shapes. A "+" country code then digits or groups ("+44 20 7946 0958", "+1 (555) 123-4567",
# "+81 3-1234-5678"); an area code in parentheses ("(415) 555-0132"); North American 3-3-4 with one
# separator ("555-123-4567"); a national trunk "0" then groups ("030 901820", "03-1234-5678",
# "01 23 45 67 89"). Never a bare digit run: in code that is an integer.
_PHONE_INTERNATIONAL = re.compile(
    r"\+(?<![\w+]\+)[1-9]\d{0,2}(?:\d{4,12}|(?:[ .-]?\(\d{1,4}\) ?\d{1,5})?(?:[ .-]\d{1,6}){1,5})(?!\w|[.-]?\d)"
)
_PHONE_AREA_CODE = re.compile(r"\((?<![\w)\]]\()\d{2,5}\) ?\d{3,4}[ .-]?\d{4}(?!\w|[.-]?\d)")
_PHONE_NORTH_AMERICAN = re.compile(r"\d(?<![\w.+-]\d)\d{2}(?P<sep>[.-])\d{3}(?P=sep)\d{4}(?!\w|[.-]?\d)")
_PHONE_NATIONAL = re.compile(r"0(?<![\w.+-]0)[1-9]\d{0,3}(?P<sep>[ -])\d{2,8}(?:(?P=sep)\d{2,8}){0,3}(?!\w|[.,-]?\d)")


# The shapes that say "phone number" on their own; the residual scan counts every one with 7-15
# digits, whatever phonenumbers says of it. Not the national trunk "0" shape: "012 0123" (octal
# numbers in Python docs) has it too, and only phonenumbers' metadata tells them apart.
PHONE_SHAPES: tuple[re.Pattern[str], ...] = (_PHONE_INTERNATIONAL, _PHONE_AREA_CODE, _PHONE_NORTH_AMERICAN)


@cache
def _patterns(phone_regions: tuple[str, ...]) -> tuple[_Pattern, ...]:
    """The pattern detectors in the order they run, after the secrets. Emails first (domains hold
    dots and digits), then the number-shaped kinds, most specific first; each runs over the text
    the ones before it redacted, so two kinds never share characters."""
    possible = _possible_phone(phone_regions, valid=False)
    return (
        _Pattern("email", _EMAIL, lambda text, s, e: routable_email(text[s:e]),
                 hint=lambda text: _EMAIL_HINT.search(text) is not None),
        _Pattern("email", _OBFUSCATED_EMAIL, _routable_obfuscated,
                 hint=lambda text: _OBFUSCATED_HINT.search(text) is not None),
        _Pattern("credit_card", _CARD_GROUPED, _luhn_valid),
        _Pattern("credit_card", _CARD_AMEX, _luhn_valid),
        _Pattern("ip_address", _IPV6, identifying_address, hint=lambda text: _IPV6_HINT.search(text) is not None),
        _Pattern("ip_address", _IPV4, identifying_address, hint=lambda text: _IPV4_HINT.search(text) is not None),
        _Pattern("phone", _PHONE_INTERNATIONAL, possible, hint=lambda text: "+" in text),
        _Pattern("phone", _PHONE_AREA_CODE, possible),
        _Pattern("phone", _PHONE_NORTH_AMERICAN, possible),
        _Pattern("phone", _PHONE_NATIONAL, _possible_phone(phone_regions, valid=True)),
    )


# --- secrets: detect-secrets ---------------------------------------------------------------------

class GoogleApiKeyDetector(RegexBasedDetector):
    """Google API keys ("AIza" and 35 URL-safe characters): no detect-secrets plugin knows them yet;
    written as a plugin of its own so it runs like the rest."""

    secret_type = "Google API Key"
    denylist = [re.compile(r"AIza[0-9A-Za-z_-]{35}(?![\w-])")]


# The token-format plugins: each knows one vendor's token shape. Left out: the high-entropy string
# plugins (every hash and test vector in code is one), the keyword-shaped vendor plugins for
# Artifactory, Cloudant, IBM and SoftLayer (3-10x slower than all the others together, and
# covered by the keyword detector below), and the public-IP plugin (ip_address does that).
_TOKEN_PLUGINS: tuple[RegexBasedDetector, ...] = tuple(plugin() for plugin in (
    AWSKeyDetector, AzureStorageKeyDetector, BasicAuthDetector, DiscordBotTokenDetector, GitHubTokenDetector,
    GitLabTokenDetector, GoogleApiKeyDetector, JwtTokenDetector, MailchimpDetector, NpmDetector, OpenAIDetector,
    PypiTokenDetector, SendGridDetector, SlackDetector, SquareOAuthDetector, StripeDetector,
    TelegramBotTokenDetector, TwilioKeyDetector,
))
# Plugins whose patterns match context around the secret ("aws_key = '...'", "://user:...@",
# "//registry/:_authToken=..."): the secret is their first group. Elsewhere a group only names a
# token's prefix ("(ghp|gho)_...") and the secret is the whole match.
_SECRET_IN_GROUP = (AWSKeyDetector, BasicAuthDetector, NpmDetector)
_PRIVATE_KEY = PrivateKeyDetector()
# A private key is its whole PEM block, not the header the plugin finds; an unterminated block runs
# to the end of the text.
_PEM_BLOCK = re.compile(
    r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----|\Z)", re.S
)
_KEYWORDS = KeywordDetector()
# The keyword detector runs line by line (its patterns match one assignment); only lines naming a
# secret-like field (detect-secrets' own keyword list, lower case) are worth its time.
_KEYWORD_LINE = re.compile("|".join(DENYLIST))
_MIN_SECRET_CHARS = 8  # NIST's minimum password length: "yes" or "none" is a setting, not a secret


def _plausible_secret(value: str) -> bool:
    return len(value) >= _MIN_SECRET_CHARS and not (
        is_sequential_string(value) or is_potential_uuid(value) or is_templated_secret(value)
        or value.startswith(("$", "<"))
    )


def _random_looking(value: str) -> bool:
    """Unquoted values in code are expressions ("token = tokenize.generate_tokens(...)"); one that
    mixes letters and digits over 16+ characters without calls or attribute access is a secret."""
    return len(value) >= 16 and any(c.isdigit() for c in value) and any(c.isalpha() for c in value) \
        and not any(c in value for c in "().[]")


def _keyword_lines(text: str) -> Iterator[str]:
    """The lines of ``text`` naming a secret-like field, each once."""
    end = -1
    # Searched in the lower-cased text: the same search with re.IGNORECASE is 20x slower.
    for match in _KEYWORD_LINE.finditer(text.lower()):
        if match.start() <= end:
            continue  # a second keyword on a line already yielded
        start = text.rfind("\n", 0, match.start()) + 1
        end = text.find("\n", match.end())
        end = len(text) if end < 0 else end
        yield text[start:end]


def _keyword_secrets(text: str) -> Iterator[str]:
    for line in _keyword_lines(text):
        for value in _KEYWORDS.analyze_string(line):  # quoted values: "api_key = '...'"
            if _plausible_secret(value):
                yield value
        for value in _KEYWORDS.analyze_string(line, CONFIG_DENYLIST_REGEX_TO_GROUP):  # "password: ...", "key=..."
            if _plausible_secret(value) and _random_looking(value):
                yield value


# A token ends where its characters end: some plugin patterns stop early on purpose (the JWT one
# is lazy, the Slack one lower-case only) because detect-secrets only needs to know a line has one.
_TOKEN_TAIL = re.compile(r"[\w+/=-]*")


def _token_secrets(text: str) -> Iterator[str]:
    for plugin in _TOKEN_PLUGINS:
        if isinstance(plugin, MailchimpDetector) and "-us" not in text:
            continue  # its pattern starts with 32 alphanumerics: the slowest scan of all, for a rare key
        for pattern in plugin.denylist:
            for match in pattern.finditer(text):
                if isinstance(plugin, _SECRET_IN_GROUP) and pattern.groups:
                    yield match.group(1)
                    continue
                secret = match.group() + _TOKEN_TAIL.match(text, match.end()).group()
                if not isinstance(plugin, JwtTokenDetector) or plugin.is_formally_valid(secret):
                    yield secret


def _redact_secrets(text: str, found: list[str]) -> str:
    secrets = set(_token_secrets(text))
    secrets.update(_keyword_secrets(text))
    if any(True for _ in _PRIVATE_KEY.analyze_string(text)):
        secrets.update(_PEM_BLOCK.findall(text))
    # Longest first: a JWT or a PEM block may hold a shorter secret's text. A placeholder left by an
    # earlier pass ("://user:<API_KEY>@host") is no secret: redaction stays idempotent.
    for secret in sorted((s for s in secrets if PLACEHOLDERS["api_key"] not in s), key=len, reverse=True):
        count = text.count(secret)
        if count:
            found.extend([secret] * count)
            text = text.replace(secret, PLACEHOLDERS["api_key"])
    return text


def _substitute(detector: _Pattern, text: str, found: list[str]) -> str:
    placeholder = PLACEHOLDERS[detector.kind]
    has_pii_group = "pii" in detector.pattern.groupindex

    def replace(match: re.Match[str]) -> str:
        start, end = match.span("pii") if has_pii_group else match.span()
        if not detector.accept(text, start, end):
            return match.group()
        found.append(text[start:end])
        return text[match.start() : start] + placeholder + text[end : match.end()]

    return detector.pattern.sub(replace, text)


def _redact(text: str, kinds: tuple[str, ...], phone_regions: tuple[str, ...]) -> tuple[str, dict[str, list[str]]]:
    """The text with every detection of ``kinds`` replaced, and the detections per kind."""
    found: dict[str, list[str]] = {kind: [] for kind in kinds}
    # Secrets first: a token holds digit runs, "@" and dots that later detectors would take for a
    # phone number, an e-mail or an address.
    if "api_key" in found:
        text = _redact_secrets(text, found["api_key"])
    for detector in _patterns(phone_regions):
        if detector.kind in found and detector.hint(text):
            text = _substitute(detector, text, found[detector.kind])
    return text, found


def redact_pii(
    text: str, kinds: Iterable[str], phone_regions: Iterable[str] = DEFAULT_PHONE_REGIONS
) -> tuple[str, dict[str, int]]:
    """Replace every PII detection of ``kinds`` by its placeholder; returns the text and the
    number of replacements per kind. Idempotent: placeholders are never detected."""
    redacted, found = _redact(text, checked_pii_kinds(kinds), checked_phone_regions(phone_regions))
    return redacted, {kind: len(matches) for kind, matches in found.items()}


def find_pii(
    text: str, kinds: Iterable[str] = PII_KINDS, phone_regions: Iterable[str] = DEFAULT_PHONE_REGIONS
) -> dict[str, list[str]]:
    """The PII detections of ``kinds`` in ``text``, per kind: exactly what ``redact_pii`` replaces."""
    return _redact(text, checked_pii_kinds(kinds), checked_phone_regions(phone_regions))[1]
