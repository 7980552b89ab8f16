"""PII: the redactor (maintained detectors) on a realistic messy corpus and on look-alikes, and the
independent residual scan that judges its output, down to the blocking gate in a real run."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
import yaml

from llm_assets.data.pii import PLACEHOLDERS, find_pii, redact_pii
from llm_assets.data.residual_pii import residual_counts, scan_residual_pii
from llm_assets.definitions import build_definitions
from llm_assets.manifest import PII_KINDS
from llm_assets.runner import materialize_graph

FIXTURES = Path(__file__).parent / "fixtures"
CORPUS = [json.loads(line) for line in (FIXTURES / "pii_corpus.jsonl").read_text().splitlines()]
LOOKALIKES = (FIXTURES / "pii_lookalikes.txt").read_text().splitlines()
NONE = dict.fromkeys(PII_KINDS, 0)

# Realistic secrets the redactor misses and the residual scan catches: detect-secrets' keyword list
# has no "token", so OAuth tokens under token-named fields pass it.
SLIPS_PAST = {
    "yaml-token": "oauth:\n  client_id: reporting-app\n  access_token: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b\n",
    "json-refresh-token": '{"client_id": "reporting-app", "refresh_token": "1//0gL9x7bQ2mN4kR8vT3yW6pZ1cH5dS0aE2uGiJ"}',
}


@pytest.mark.parametrize("doc", CORPUS, ids=[d["id"] for d in CORPUS])
def test_messy_pii_is_redacted_per_kind_and_the_independent_scan_finds_none_left(doc):
    redacted, counts = redact_pii(doc["text"], PII_KINDS)
    assert counts == {**NONE, **doc["expected"]}
    assert residual_counts(redacted) == NONE
    assert redact_pii(redacted, PII_KINDS) == (redacted, NONE)  # idempotent: placeholders are not PII


def test_the_independent_scan_sees_the_raw_corpus_pii():
    """The residual scan is no rubber stamp: on the unredacted corpus it finds every kind."""
    raw = pl.DataFrame({"id": [d["id"] for d in CORPUS], "text": [d["text"] for d in CORPUS]})
    report = scan_residual_pii(raw)
    assert set(report.leaked) == set(PII_KINDS)
    assert report.documents["credit_card"] == ["payment"] and "server-log" in report.documents["ip_address"]


@pytest.mark.parametrize("text", LOOKALIKES)
def test_lookalikes_stay_intact(text):
    """Versions, section and clause numbers, dates, file names with '@', local hosts, code numbers."""
    assert redact_pii(text, PII_KINDS) == (text, NONE)
    assert residual_counts(text) == NONE


def test_private_key_blocks_go_whole_and_url_credentials_keep_the_url():
    doc = {d["id"]: d["text"] for d in CORPUS}
    redacted = redact_pii(doc["private-key"], ["api_key"])[0]
    assert "MIIE" not in redacted and redacted.startswith("Paste this into ~/.ssh/id_rsa:\n<API_KEY>\nthen")
    assert "https://deploy:<API_KEY>@ci.example.com/hooks/build" in redact_pii(doc["key-in-url"], ["api_key"])[0]


def test_obfuscated_email_becomes_one_placeholder():
    assert redact_pii("write to priya [at] example [dot] org today", ["email"])[0] == (
        f"write to {PLACEHOLDERS['email']} today"
    )


@pytest.mark.parametrize("doc_id", sorted(SLIPS_PAST))
def test_pii_that_slips_past_the_redactor_is_caught_by_the_residual_scan(doc_id):
    text = SLIPS_PAST[doc_id]
    assert redact_pii(text, PII_KINDS)[1] == NONE
    assert sum(residual_counts(text).values()) == 1


def test_unknown_phone_regions_are_refused():
    with pytest.raises(ValueError, match="stages.clean.phone_regions"):
        find_pii("x", phone_regions=["XX"])


@pytest.fixture
def leaky_defs(settings, manifest_path, tmp_path):
    """A JSONL source of English prose where two OAuth tokens slip past the redactor."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    prose = ("The quarterly report covers the migration of the billing service to the new cluster, the "
             "retirement of the old queue, and the plan for the next release of the customer portal. ") * 3
    texts = [prose + SLIPS_PAST["yaml-token"], prose + SLIPS_PAST["json-refresh-token"], prose]
    (folder / "tickets.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    manifest = yaml.safe_load(manifest_path.read_text())
    manifest["sources"] = [{"kind": "local", "name": "web", "paths": [f"{folder}/*.jsonl"]}]
    manifest_path.write_text(yaml.safe_dump(manifest))
    return build_definitions(settings)


def test_residual_pii_blocks_the_shard_and_names_documents_not_pii(leaky_defs, instance):
    result = materialize_graph(leaky_defs, instance, log=lambda _: None)
    assert not result.success
    key = dg.AssetCheckKey(dg.AssetKey("clean_corpus"), "residual_pii")
    check = instance.event_log_storage.get_latest_asset_check_execution_by_key([key])[key]
    assert check.status.value == "FAILED"
    evaluation = check.event.dagster_event.event_specific_data
    metadata = {k: v.value for k, v in evaluation.metadata.items()}
    assert metadata["residual_api_key"] == 2 and metadata["residual_phone"] == 0
    assert set(metadata["documents"]) == {"api_key"} and len(metadata["documents"]["api_key"]) == 2
    assert "9f86d081" not in json.dumps(metadata) + evaluation.description
    # The blocking check held the shard's downstream step in the same run.
    assert not instance.fetch_materializations(dg.AssetKey("minhash_signatures"), limit=1).records
