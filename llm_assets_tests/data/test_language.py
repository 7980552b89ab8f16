"""Language identification with lingua: target languages kept, others dropped and counted, code
judged by its words, and the per-language kept-fraction check failing on a biased filter."""

from __future__ import annotations

import hashlib
import json
import sysconfig
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
import yaml

from llm_assets.data.cleaning import clean_frame
from llm_assets.data.language import UNDETERMINED, identify_language
from llm_assets.definitions import build_definitions
from llm_assets.manifest import CleanRecipe
from llm_assets.runner import materialize_graph

ENGLISH = ("The committee reviewed the proposal in detail and agreed that the new library should open on "
           "weekends, provided that enough volunteers can be found to staff the reading rooms and the archive. "
           "The decision will be confirmed at next month's meeting and carried out by the city council.")
GERMAN = ("Der Ausschuss hat den Vorschlag ausführlich geprüft und ist sich einig, dass die neue Bibliothek "
          "auch am Wochenende öffnen soll, sofern sich genügend Freiwillige für die Lesesäle finden lassen. "
          "Die Entscheidung wird in der Sitzung im nächsten Monat bestätigt und von der Stadt umgesetzt.")
FRENCH = ("Le comité a examiné la proposition en détail et a convenu que la nouvelle bibliothèque devrait "
          "ouvrir le week-end, à condition de trouver assez de bénévoles pour les salles de lecture. "
          "La décision sera confirmée lors de la réunion du mois prochain et appliquée par la mairie.")
CHINESE = ("委员会详细审查了这项提案，一致认为新图书馆应该在周末开放，前提是能够找到足够的志愿者来管理阅览室和档案馆。"
           "这项决定将在下个月的会议上正式通过，并由市政府负责实施。") * 4


def frame(rows: list[tuple[str, str]]) -> pl.DataFrame:
    return pl.DataFrame(
        [(i, t, "test", f"test://{i}", "text", hashlib.sha256(t.encode()).hexdigest()) for i, t in rows],
        schema={c: pl.String for c in ("id", "text", "source", "uri", "kind", "sha256")}, orient="row",
    )


@pytest.mark.parametrize(("text", "code"), [(ENGLISH, "en"), (GERMAN, "de"), (FRENCH, "fr"), (CHINESE, "zh")])
def test_languages_are_identified(text, code):
    assert identify_language(text, ("en",), min_letters=100, min_confidence=0.5) == code


def test_too_few_letters_are_not_judged():
    assert identify_language("x = [1, 2, 3]  # ok", ("en",), min_letters=200, min_confidence=0.5) == UNDETERMINED


def test_documents_outside_the_targets_are_dropped_and_counted():
    cleaned, stats = clean_frame(frame([("en", ENGLISH), ("de", GERMAN), ("fr", FRENCH)]), CleanRecipe(min_chars=10))
    assert cleaned["id"].to_list() == ["en"] and cleaned["language"].to_list() == ["en"]
    assert stats.dropped_by_reason["language"] == 2
    assert stats.languages_in == {"en": 1, "de": 1, "fr": 1} and stats.languages_out == {"en": 1}
    both = CleanRecipe(min_chars=10, languages=["en", "de"])
    assert clean_frame(frame([("en", ENGLISH), ("de", GERMAN)]), both)[0]["language"].to_list() == ["en", "de"]


def test_unknown_language_codes_are_refused():
    with pytest.raises(ValueError, match="stages.clean.languages"):
        clean_frame(frame([("en", ENGLISH)]), CleanRecipe(languages=["english"]))


def test_the_kept_fraction_per_language_shows_a_filter_biased_against_a_language():
    """Chinese has no spaces between words: the mean-word-length rule drops it. The per-language
    fraction the check compares with min_language_kept_fraction falls to 0 for zh, not for en."""
    recipe = CleanRecipe(min_chars=10, languages=["en", "zh"])
    _, stats = clean_frame(frame([("en", ENGLISH), ("zh", CHINESE)]), recipe)
    assert stats.dropped_by_reason["mean_word_length_high"] == 1
    assert stats.language_kept_fractions(recipe.languages) == {"en": 1.0, "zh": 0.0}


def test_the_standard_library_is_kept_as_english():
    """The default corpus: code and docstrings judged by their words."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted([*root.glob("email/**/*.py"), *root.glob("json/*.py"), *root.glob("asyncio/*.py")])
    rows = [(str(f.relative_to(root)), f.read_text(encoding="utf-8")) for f in files]
    _, stats = clean_frame(frame(rows), CleanRecipe())
    assert stats.dropped_by_reason["language"] == 0
    assert stats.languages_in["en"] >= 0.9 * len(rows)


def test_the_language_kept_fraction_check_fails_on_a_filter_biased_against_a_language(
    settings, manifest_path, instance, tmp_path
):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "mixed.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in (ENGLISH, CHINESE, GERMAN)))
    manifest = yaml.safe_load(manifest_path.read_text())
    manifest["sources"] = [{"kind": "local", "name": "web", "paths": [f"{folder}/*.jsonl"]}]
    manifest.setdefault("stages", {})["clean"] = {"languages": ["en", "zh"], "min_chars": 10}
    manifest_path.write_text(yaml.safe_dump(manifest))
    materialize_graph(build_definitions(settings), instance, log=lambda _: None)

    key = dg.AssetCheckKey(dg.AssetKey("clean_corpus"), "language_kept_fraction")
    check = instance.event_log_storage.get_latest_asset_check_execution_by_key([key])[key]
    assert check.status.value == "FAILED"
    metadata = check.event.dagster_event.event_specific_data.metadata
    assert metadata["kept_fraction_per_language"].value == {"en": 1.0, "zh": 0.0}
    clean = instance.fetch_materializations(dg.AssetKey("clean_corpus"), limit=1).records[0].asset_materialization
    assert clean.metadata["dropped_by_reason"].value["language"] == 1  # the German document
