"""The residual PII scan of a cleaned shard: a second, independent opinion on what redaction left.

It must not share the redactor's blind spots, so it uses other detectors
(:mod:`llm_assets.data.pii` is the redactor):

- ``email``, ``credit_card``, ``ip_address``: Presidio's predefined pattern recognizers (their own
  regexes and checks; no NLP model, so it runs offline);
- ``api_key``: vendor token prefixes and high-entropy values assigned to secret-named fields
  (``token``, ``secret``, ``password``, ``api_key``...), a pattern family apart from
  detect-secrets' plugins: it also knows ``token: ...`` and ``access_key = ...``, which
  detect-secrets' keyword list does not;
- ``phone``: every phone-shaped number with 7 to 15 digits, without phonenumbers' judgement that
  the redactor applies (Presidio's phone recognizer *is* phonenumbers, and its finder takes every
  long integer in code for a phone).

Both share one policy of what is not PII (``identifying_address``, ``routable_email``), so that a
version number or a file name with "@" is judged alike. The scan reports counts per kind and the
ids of the documents holding each kind, never the PII itself.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cache

import polars as pl

from llm_assets.data.pii import PHONE_SHAPES, identifying_address, routable_email
from llm_assets.manifest import PII_KINDS

_VENDOR_KEY = re.compile(
    r"(?<![\w-])(?:"
    r"AKIA[A-Z0-9]{16}|ASIA[A-Z0-9]{16}"  # AWS access key id
    r"|gh[pousr]_[A-Za-z0-9]{36}|github_pat_\w{22,}"  # GitHub
    r"|xox[abposr]-[A-Za-z0-9-]{10,}"  # Slack
    r"|sk-(?:proj-|svcacct-|admin-)?[\w-]{20,}"  # OpenAI-style
    r"|AIza[\w-]{35}"  # Google API key
    r"|[sr]k_(?:live|test)_\w{10,}"  # Stripe secret keys
    r"|eyJ[\w-]{8,}\.eyJ[\w-]{8,}\.[\w-]*"  # JWT: base64url of '{"' twice, then the signature
    r"|-----BEGIN [A-Z ]*PRIVATE KEY(?: BLOCK)?-----"  # a private key block
    r")(?![\w-])"
)
# "api_key = ...", "token: ...", '"password": "..."'; only a value of 20+ characters that looks
# random counts, so "token = tokenize.generate_tokens(...)" is left alone.
_SECRET_ASSIGNMENT = re.compile(
    r"(?i)(?:api[_-]?key|secret|token|passw(?:or)?d|private[_-]?key|access[_-]?key)[\w-]*[\"']?"
    r"\s*[:=]\s*(?P<quote>[\"']?)(?P<value>[\w+/=.~-]{20,})(?P=quote)(?![\w+/=.~(\[-])"
)


def _shannon_entropy(value: str) -> float:
    n = len(value)
    return -sum(c / n * math.log2(c / n) for c in Counter(value).values())


def _looks_random(value: str) -> bool:
    return any(c.isdigit() for c in value) and any(c.isalpha() for c in value) and _shannon_entropy(value) >= 3.5


def _keys(text: str) -> int:
    return len(_VENDOR_KEY.findall(text)) + sum(
        _looks_random(m.group("value")) for m in _SECRET_ASSIGNMENT.finditer(text)
    )


def _phones(text: str) -> int:
    return sum(
        7 <= sum(c.isdigit() for c in m.group()) <= 15 for shape in PHONE_SHAPES for m in shape.finditer(text)
    )


@cache
def _presidio() -> dict[str, Callable[[str], int]]:
    """Presidio's recognizers, built once. Imported here, not at module level: the package pulls
    transformers and spaCy in (10+ s), which only this check should pay."""
    from presidio_analyzer.predefined_recognizers import CreditCardRecognizer, EmailRecognizer, IpRecognizer

    class OfflineEmailRecognizer(EmailRecognizer):
        # Presidio's own check calls tldextract's default extractor, which fetches the suffix list
        # over the network first; the shared policy uses the bundled copy.
        def validate_result(self, pattern_text: str) -> bool:
            return routable_email(pattern_text)

    email, card, ip = OfflineEmailRecognizer(), CreditCardRecognizer(), IpRecognizer()

    def count(recognizer, text: str, keep: Callable[[int, int], bool] = lambda s, e: True) -> int:
        results = recognizer.analyze(text, entities=recognizer.supported_entities, nlp_artifacts=None)
        return sum(r.score > 0 and keep(r.start, r.end) for r in results)

    return {
        "email": lambda text: count(email, text),
        "credit_card": lambda text: count(card, text),
        "ip_address": lambda text: count(ip, text, lambda s, e: identifying_address(text, s, e)),
    }


def residual_counts(text: str) -> dict[str, int]:
    """PII detections per kind (all of PII_KINDS) in one text, by the independent detectors."""
    presidio = _presidio()
    counts = {kind: detect(text) for kind, detect in presidio.items()}
    counts["api_key"] = _keys(text)
    counts["phone"] = _phones(text)
    return {kind: counts[kind] for kind in PII_KINDS}


@dataclass
class ResidualReport:
    """What the scan found: detections per kind, and per kind the ids of the documents holding any."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PII_KINDS, 0))
    documents: dict[str, list[str]] = field(default_factory=lambda: {kind: [] for kind in PII_KINDS})

    @property
    def leaked(self) -> dict[str, int]:
        return {kind: n for kind, n in self.counts.items() if n}

    def documents_with(self, kinds: Iterable[str]) -> dict[str, list[str]]:
        return {kind: self.documents[kind] for kind in kinds}

    def merge(self, other: ResidualReport) -> None:
        for kind in PII_KINDS:
            self.counts[kind] += other.counts[kind]
            self.documents[kind] += other.documents[kind]


def scan_residual_pii(frame: pl.DataFrame) -> ResidualReport:
    """The independent scan over a cleaned frame's ``id`` and ``text`` columns: every kind, whatever
    the recipe redacted, so a partial recipe fails it."""
    report = ResidualReport()
    for doc_id, text in zip(frame["id"].to_list(), frame["text"].to_list()):
        for kind, n in residual_counts(text or "").items():
            if n:
                report.counts[kind] += n
                report.documents[kind].append(doc_id)
    return report
