"""A drive launches no run for what is unchanged, and still rebuilds what changed or went bad."""

from __future__ import annotations

import dagster as dg
import yaml

from llm_assets.definitions import build_definitions
from llm_assets.runner import materialize_graph
from llm_assets.store import open_store
from llm_assets.unchanged import _installed_distributions

SELECT = "key:raw_corpus"


def with_local_docs(manifest_path) -> None:
    """One stdlib shard and two local text files: three raw_corpus partitions."""
    docs = manifest_path.parent / "docs"
    docs.mkdir(exist_ok=True)
    for name in ("a", "b"):
        (docs / f"{name}.txt").write_text(f"document {name} has a few words in it. " * 20)
    manifest = yaml.safe_load(manifest_path.read_text())
    manifest["sources"] = [{"kind": "python_stdlib", "name": "stdlib", "include": ["json/*"], "shard_mb": 1.0},
                           {"kind": "local", "name": "docs", "paths": ["docs/*.txt"]}]
    manifest_path.write_text(yaml.safe_dump(manifest, sort_keys=False))


def drive(defs: dg.Definitions, instance: dg.DagsterInstance) -> tuple[int, dict[str, str], list[str]]:
    """Runs launched, each partition's hash, and the driver's log."""
    before, lines = len(instance.get_run_records()), []
    result = materialize_graph(defs, instance, selection=SELECT, log=lines.append)
    assert result.success, lines
    return len(instance.get_run_records()) - before, {o.partition: o.sha256 for o in result.outcomes}, lines


def test_an_unchanged_selection_launches_no_run_and_a_change_or_a_corrupt_object_does(
    settings, manifest_path, instance
):
    with_local_docs(manifest_path)
    defs = build_definitions(settings)
    runs, built, _ = drive(defs, instance)
    assert runs == 3 and len(built) == 3

    runs, again, lines = drive(defs, instance)
    assert runs == 0 and again == built, "every partition is reported as the cache hit it is, without a run"
    assert "wave [raw_corpus]: 0 run(s), 3 unchanged" in lines

    # A flipped byte in a stored object: that partition runs again and its artifact is rewritten.
    store = open_store(settings.store_uri)
    sha = built["docs-a.txt"]
    path = store.local_dir(sha) / store.manifest(sha).files[0].path
    data = bytearray(path.read_bytes())
    data[0] ^= 1
    path.write_bytes(bytes(data))
    runs, repaired, _ = drive(defs, instance)
    assert runs == 1 and repaired == built and store.verify(sha).ok

    # A changed input file: the world differs, every partition runs, the changed one rebuilds.
    (manifest_path.parent / "docs" / "a.txt").write_text("document a now says something else entirely. " * 20)
    runs, changed, _ = drive(defs, instance)
    assert runs == 3
    assert changed["docs-a.txt"] != built["docs-a.txt"]
    assert {k: v for k, v in changed.items() if k != "docs-a.txt"} == \
        {k: v for k, v in built.items() if k != "docs-a.txt"}
    runs, _, _ = drive(defs, instance)
    assert runs == 0


def test_a_drive_launching_every_run_keeps_what_it_made_skippable(settings, manifest_path, instance):
    """Its runs make new materializations: it records them, or the next drive would skip nothing."""
    with_local_docs(manifest_path)
    defs = build_definitions(settings)
    runs, built, _ = drive(defs, instance)
    assert runs == 3
    assert materialize_graph(defs, instance, selection=SELECT, log=lambda _: None, skip_unchanged=False).success
    runs, again, _ = drive(defs, instance)
    assert runs == 0 and again == built


def test_where_a_command_starts_does_not_change_the_installed_libraries(tmp_path, monkeypatch):
    """`python -m llm_assets.cli` from the project's folder puts it (and its *.egg-info) first on
    sys.path, `llm-assets` puts the script's folder there: both drives must read one world."""
    (tmp_path / "llm_assets.egg-info").mkdir()
    installed = _installed_distributions()
    assert installed and all(name.endswith((".dist-info", ".egg-info")) for name, _ in installed)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend("")
    assert _installed_distributions() == installed
