"""Cleaning of one shard: HTML to text, normalisation, PII redaction, quality filters, the frame."""

from __future__ import annotations

import hashlib
import json
import sysconfig
from pathlib import Path

import polars as pl
import pytest

from llm_assets.data.cleaning import clean_frame
from llm_assets.data.html_text import html_to_text
from llm_assets.data.normalize import normalize_text
from llm_assets.data.pii import PLACEHOLDERS, find_pii, redact_pii
from llm_assets.data.quality import QUALITY_RULES, quality_failures, quality_signals
from llm_assets.data.residual_pii import scan_residual_pii
from llm_assets.manifest import PII_KINDS, CleanRecipe

RAW_COLUMNS = ["id", "text", "source", "uri", "kind", "sha256"]

PAGE = """<!DOCTYPE html><html><head><title>Page title</title>
<style>p { color: red }</style><script>var hidden = "<p>script text</p>";</script></head>
<body><nav><a href="/">Home</a> | <a href="/about">About</a></nav><header>Site header</header>
<h1>Fish &amp; chips</h1>
<p>First   paragraph
spread over <b>two</b> source lines, &lt;escaped&gt; and it&#39;s fine.</p><p>Second paragraph.</p>
<ul><li>one</li><li>two</li></ul>
<footer>Copyright footer</footer><aside>Advert</aside><noscript>Enable JavaScript</noscript>
</body></html>"""


# --- html_to_text ---------------------------------------------------------------------------


def test_html_keeps_visible_text_as_blocks_and_drops_the_rest():
    text = html_to_text(PAGE)
    assert text.split("\n") == [
        "Fish & chips",
        "",
        "First paragraph spread over two source lines, <escaped> and it's fine.",
        "",
        "Second paragraph.",
        "",
        "one",
        "two",
    ]
    for gone in ("script text", "color", "Home", "Site header", "Copyright", "Advert", "Enable", "Page title"):
        assert gone not in text


def test_html_cells_and_preformatted_text():
    html = "<table><tr><td>a</td><td>b</td></tr><tr><td>c</td></tr></table><pre>def f():\n    return 1</pre>"
    assert html_to_text(html) == "a b\nc\n\ndef f():\n    return 1"


@pytest.mark.parametrize(
    "html",
    [
        "<div><p>unclosed <b>bold",
        "</div></p>stray ends",
        "<![if !IE]>conditional<![endif]>",  # the stdlib parser asserts on this one
        "<![ x",
        "\x00\xff\ufffd<<>><a b='",
        "<nav>never closed<p>text",
        "&#99999999999; &bogus; <!-- unterminated",
        "",
    ],
)
def test_malformed_html_does_not_raise(html):
    assert isinstance(html_to_text(html), str)


def test_an_unclosed_boilerplate_element_ends_with_the_body():
    assert html_to_text("<nav>menu</body>after") == "after"
    assert "conditional" in html_to_text("<![if !IE]>conditional<![endif]>")


# --- normalize_text -------------------------------------------------------------------------


def test_nfkc_folds_compatibility_characters_and_nfc_does_not():
    assert normalize_text("\ufb01le \uff11\uff12\uff13") == "file 123"
    assert normalize_text("\ufb01le", form="NFC") == "\ufb01le"
    assert normalize_text("e\u0301", form="NFC") == "\u00e9"


def test_normalize_removes_invisible_and_control_characters_but_keeps_fffd():
    text = "zero\u200bwidth\u200c\u200d\ufeff\u2060 bell\x07 nul\x00 esc\x1b[0m tab\there \ufffd bad byte"
    assert normalize_text(text) == "zerowidth bell nul esc[0m tab\there \ufffd bad byte"


def test_normalize_line_breaks_and_trailing_whitespace():
    assert normalize_text("a\r\nb\rc\u2028d  \t\ne\u3000\n") == "a\nb\nc\nd\ne\n"


# --- PII ------------------------------------------------------------------------------------

POSITIVES = [
    ("email", "mail jane.doe+lists@mail.example.co.uk today", "jane.doe+lists@mail.example.co.uk"),
    ("phone", "call +1 (555) 123-4567 now", "+1 (555) 123-4567"),
    ("phone", "call 555-123-4567.", "555-123-4567"),
    ("phone", "office +44 20 7946 0958", "+44 20 7946 0958"),
    ("phone", "office (020) 7946 0958", "(020) 7946 0958"),
    ("phone", "E.164 +14155552671", "+14155552671"),
    ("ip_address", "host 203.0.113.7 answered", "203.0.113.7"),
    ("ip_address", "lan 192.168.1.10.", "192.168.1.10"),
    ("ip_address", "v6 2001:db8::1 up", "2001:db8::1"),
    ("ip_address", "link fe80::1ff:fe23:4567:890a", "fe80::1ff:fe23:4567:890a"),
    ("ip_address", "full 2001:0db8:85a3:0000:0000:8a2e:0370:7334", "2001:0db8:85a3:0000:0000:8a2e:0370:7334"),
    ("credit_card", "card 4111 1111 1111 1111 exp", "4111 1111 1111 1111"),
    ("credit_card", "card 4111-1111-1111-1111 exp", "4111-1111-1111-1111"),
    ("credit_card", "card 5555555555554444 exp", "5555555555554444"),
    ("credit_card", "amex 3782 822463 10005", "3782 822463 10005"),
    ("api_key", "aws AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLE"),
    ("api_key", "gh ghp_a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8", "ghp_a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"),
    ("api_key", "slack xoxb-1234567890-abcdefghij", "xoxb-1234567890-abcdefghij"),
    (
        "api_key",
        "openai sk-proj-Xb4kQ9mZ2rT7vL1nW8yPT3BlbkFJa5Hc0dE6fG3jK9mN2pQr",
        "sk-proj-Xb4kQ9mZ2rT7vL1nW8yPT3BlbkFJa5Hc0dE6fG3jK9mN2pQr",
    ),
    ("api_key", "google AIzaSyA1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q", "AIzaSyA1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q"),
    ("api_key", "stripe sk_live_4eC39HqLyjWDarjtT1zdp7dc", "sk_live_4eC39HqLyjWDarjtT1zdp7dc"),
    (
        "api_key",
        "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
    ),
    ("api_key", 'api_key = "q8Zr4Tn0Lw2Xv7Ke9Pb3Ys1M"', "q8Zr4Tn0Lw2Xv7Ke9Pb3Ys1M"),
    (
        "api_key",
        "AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    ),
]


@pytest.mark.parametrize(("kind", "text", "pii"), POSITIVES)
def test_pii_is_replaced_by_its_typed_placeholder_and_counted(kind, text, pii):
    assert find_pii(text) == {k: [pii] if k == kind else [] for k in PII_KINDS}
    redacted, counts = redact_pii(text, PII_KINDS)
    assert redacted == text.replace(pii, PLACEHOLDERS[kind])
    assert counts == {k: int(k == kind) for k in PII_KINDS}
    # Only the kinds asked for are redacted.
    others = [k for k in PII_KINDS if k != kind]
    assert redact_pii(text, others) == (text, dict.fromkeys(others, 0))


def test_a_secret_assignment_loses_its_value_not_its_name():
    assert redact_pii('api_key = "q8Zr4Tn0Lw2Xv7Ke9Pb3Ys1M"', ["api_key"])[0] == 'api_key = "<API_KEY>"'
    assert redact_pii("{'client_secret': 'Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MA=='}", ["api_key"])[0] == (
        "{'client_secret': '<API_KEY>'}"
    )


NEGATIVES = [
    "Python version 3.11.7 released",
    "not an address: 1.2.3.4.5",
    "ratio 12:30:45",
    "a[1:2] and x[10::20] and a[::2] and a::b",
    "mask = 0xDEADBEEF",
    "luhn fails: 4111111111111112",
    "uuid 123e4567-e89b-12d3-a456-426614174000",
    "uuid 12345678-1234-5678-1234-567812345678",
    "listen on port 8080",
    "x = 1234567890",
    "sys.maxsize == 9223372036854775807",
    "date 2024-01-15 and 2024-01-15T12:30:45Z",
    "user@localhost",  # no dotted domain: not routable, a placeholder account in code
    "@property\ndef f(self): return a@b.sum()",
    "token = tokenize.generate_tokens(readline)",
    "password = getpass.getpass(prompt)",
    "bind 127.0.0.1, 0.0.0.0, ::1 or ff02::1; netmask 255.255.255.0",
    "section 8.2.4.44 and rfc7231#section-7.1.1.1, format +000000120",
    "1.0.0.127.in-addr.arpa",
    "sha256 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    "mac 00:1A:2B:3C:4D:5E",
    "IPv4Network('100.64.0.0/10') and IPv6Network('2001:db8::/32')",  # networks, not hosts
    "x = y +1; z = 1e+308; f(555) 123-4567",
]


@pytest.mark.parametrize("text", NEGATIVES)
def test_code_shapes_are_not_pii(text):
    assert find_pii(text) == {k: [] for k in PII_KINDS}
    assert redact_pii(text, PII_KINDS)[0] == text


MIXED = (
    "Contact jane@example.com or +1 (555) 123-4567 from 203.0.113.7, card 4111 1111 1111 1111,\n"
    "key AKIAIOSFODNN7EXAMPLE, secret = 'Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MA==', ip 2001:db8::1,"
    "jane@example.com;555-123-4567 <EMAIL>x@y.org<PHONE>\n"
)


def test_redaction_is_idempotent_and_placeholders_are_not_pii():
    redacted, counts = redact_pii(MIXED, PII_KINDS)
    assert counts == {"email": 3, "phone": 2, "ip_address": 2, "credit_card": 1, "api_key": 2}
    assert redact_pii(redacted, PII_KINDS) == (redacted, dict.fromkeys(PII_KINDS, 0))
    assert find_pii(redacted) == {k: [] for k in PII_KINDS}
    assert find_pii(" ".join(PLACEHOLDERS.values())) == {k: [] for k in PII_KINDS}


def test_unknown_pii_kinds_are_refused():
    with pytest.raises(ValueError, match="unknown PII kinds"):
        redact_pii("x", ["emial"])


# --- quality --------------------------------------------------------------------------------

RECIPE = CleanRecipe()
PROSE = "The quick brown fox jumps over the lazy dog near the quiet river bank.\n" + "\n".join(
    f"Line {i} tells a different story about the river." for i in range(5)
)


def test_quality_signals_on_crafted_text():
    signals = quality_signals("ab cd\nab cd\n\nx1 22 # ...\n")
    assert signals == {
        "chars": 25.0,
        "words": 8.0,
        "mean_word_length": 16 / 8,
        "symbol_ratio": 2 / 8,  # one '#', one '...'
        "duplicate_line_fraction": 1 / 3,  # non-empty lines: "ab cd" twice, then one more
        "alpha_word_fraction": 5 / 8,  # ab cd ab cd x1
    }
    # The ASCII fast path and the general one count words with letters alike.
    assert quality_signals("héllo 123 wörld ++ ü1")["alpha_word_fraction"] == 3 / 5
    assert quality_signals("")["words"] == 0 and quality_signals("")["alpha_word_fraction"] == 0


@pytest.mark.parametrize(
    ("text", "first_failure"),
    [
        ("Too short.", "too_short"),
        ("word " * 200_000, "too_long"),
        ("a b c d e f g h i j k l m n o p q r s t u v w x y z " * 3, "mean_word_length_low"),
        ("Pneumonoultramicroscopicsilicovolcanoconiosis " * 5, "mean_word_length_high"),
        ("# # # # # comment ... more … " * 10, "symbol_ratio"),
        ("the same line again\n" * 10 + "one other line here", "duplicate_line_fraction"),
        ("12 345 6789 1011 1213 1415 ++ -- == 99 42 7 " * 5 + "some words", "alpha_word_fraction"),
    ],
)
def test_quality_failures_name_the_failing_rule(text, first_failure):
    failures = quality_failures(quality_signals(text), RECIPE)
    assert failures[0] == first_failure
    assert set(failures) <= set(QUALITY_RULES)


def test_good_prose_passes_every_rule():
    assert quality_failures(quality_signals(PROSE), RECIPE) == []


# --- clean_frame ----------------------------------------------------------------------------


def raw_frame(rows: list[tuple[str, str, str]]) -> pl.DataFrame:
    """A raw shard frame from (id, kind, text) rows."""
    return pl.DataFrame(
        [
            (doc_id, text, "test", f"test://{doc_id}", kind, hashlib.sha256(text.encode()).hexdigest())
            for doc_id, kind, text in rows
        ],
        schema={name: pl.String for name in RAW_COLUMNS},
        orient="row",
    )


CODE = '''def parse(line):
    """Split a configuration line into its key and value."""
    key, _, value = line.partition("=")
    return key.strip(), value.strip()
'''
ROWS = [
    ("page", "html", PAGE.replace("Second paragraph.", "Write to jane@example.com for help.")),
    ("prose", "text", PROSE + "\nCall 555-123-4567 or +44 20 7946 0958 after six."),
    ("short", "text", "Too short."),
    ("code", "code", CODE + "# bad byte: \ufffd\n"),
    ("hashes", "text", "# ### ##### ... ####### #### " * 20),
    ("secret", "code", CODE + 'API_KEY = "q8Zr4Tn0Lw2Xv7Ke9Pb3Ys1M"\n'),
]


def test_clean_frame_cleans_filters_and_counts():
    raw = raw_frame(ROWS)
    cleaned, stats = clean_frame(raw, RECIPE)

    assert cleaned.columns == RAW_COLUMNS + ["language", "pii_redactions"]
    assert cleaned.schema["pii_redactions"] == pl.Int64
    assert cleaned["id"].to_list() == ["page", "prose", "code", "secret"]  # original order, drops gone
    assert cleaned["kind"].to_list() == ["text", "text", "code", "code"]
    assert cleaned["pii_redactions"].to_list() == [1, 2, 0, 1]
    texts = dict(zip(cleaned["id"], cleaned["text"]))
    assert texts["page"].startswith("Fish & chips\n\nFirst paragraph") and "<EMAIL>" in texts["page"]
    assert "<PHONE> or <PHONE>" in texts["prose"]
    assert texts["secret"].endswith('API_KEY = "<API_KEY>"\n')
    assert cleaned["sha256"].to_list() == [hashlib.sha256(t.encode()).hexdigest() for t in cleaned["text"]]
    assert cleaned["sha256"].to_list() != raw.filter(pl.col("id").is_in(cleaned["id"]))["sha256"].to_list()

    assert stats.documents_in == 6 and stats.documents_out == 4
    assert stats.html_converted == 1
    assert stats.replacement_chars == 1
    assert stats.pii_redacted == {"email": 1, "phone": 2, "ip_address": 0, "credit_card": 0, "api_key": 1}
    assert {k: n for k, n in stats.dropped_by_reason.items() if n} == {"too_short": 1, "symbol_ratio": 1}
    assert stats.documents_in == stats.documents_out + sum(stats.dropped_by_reason.values())
    assert stats.chars_in == sum(len(text) for _, _, text in ROWS)
    assert stats.chars_out == sum(len(t) for t in cleaned["text"])
    assert stats.kept_fraction == pytest.approx(4 / 6)
    metadata = json.loads(json.dumps(stats.as_metadata()))
    assert metadata["kept_fraction"] == pytest.approx(4 / 6) and metadata["pii_redacted"]["phone"] == 2

    assert scan_residual_pii(cleaned).counts == dict.fromkeys(PII_KINDS, 0)
    assert scan_residual_pii(raw).counts == {"email": 1, "phone": 2, "ip_address": 0, "credit_card": 0, "api_key": 1}


def test_a_partial_recipe_leaves_pii_for_the_residual_scan():
    cleaned, stats = clean_frame(raw_frame(ROWS), RECIPE.model_copy(update={"redact": ["email"]}))
    assert stats.pii_redacted == {"email": 1}
    assert cleaned["pii_redactions"].to_list() == [1, 0, 0, 0]
    assert scan_residual_pii(cleaned).counts == {
        "email": 0, "phone": 2, "ip_address": 0, "credit_card": 0, "api_key": 1
    }


def test_an_empty_shard_is_cleaned_to_an_empty_shard():
    cleaned, stats = clean_frame(raw_frame([]), RECIPE)
    assert cleaned.height == 0 and cleaned.columns == RAW_COLUMNS + ["language", "pii_redactions"]
    assert stats.kept_fraction == 1.0 and scan_residual_pii(cleaned).counts == dict.fromkeys(PII_KINDS, 0)


def test_real_stdlib_code_is_mostly_kept_and_only_emails_are_found():
    """The email and json packages: real code and docstrings, with their authors' addresses."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted([*root.glob("email/**/*.py"), *root.glob("json/*.py")])
    raw = raw_frame([(str(f.relative_to(root)), "code", f.read_text(encoding="utf-8")) for f in files])
    assert raw.height > 30

    cleaned, stats = clean_frame(raw, RECIPE)

    assert stats.kept_fraction >= 0.9
    # Dropped: only the empty package markers (email/mime/__init__.py).
    assert {k: n for k, n in stats.dropped_by_reason.items() if n} == {"too_short": 1}
    # The code holds its authors' addresses and nothing else that is PII: any phone, card, key or
    # address found here would be a false positive on code.
    found = {kind: [m for text in raw["text"] for m in find_pii(text, [kind])[kind]] for kind in PII_KINDS}
    assert {kind: len(matches) for kind, matches in found.items() if kind != "email"} == {
        "phone": 0, "ip_address": 0, "credit_card": 0, "api_key": 0
    }
    assert "email-sig@python.org" in found["email"] and "bob@redivi.com" in found["email"]
    assert all("@" in m and "." in m.split("@")[1] for m in found["email"])
    assert stats.pii_redacted == {**dict.fromkeys(PII_KINDS, 0), "email": len(found["email"])}
    assert scan_residual_pii(cleaned).counts == dict.fromkeys(PII_KINDS, 0)
