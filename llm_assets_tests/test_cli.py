"""`llm-assets plan`, `materialize` and `partitions prune`, as a user runs them."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import dagster as dg
import pytest
import yaml

from llm_assets.cli import EXIT_FAILED, EXIT_OK, EXIT_OVER_BUDGET, main
from llm_assets.settings import PROJECT_ROOT

SIZES = {
    "small": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 256,
              "vocab_size": 1000, "max_seq_len": 128},
    "large": {"hidden_size": 4096, "num_layers": 32, "num_heads": 32, "intermediate_size": 11008,
              "vocab_size": 32000, "max_seq_len": 4096},
}


def with_training(manifest_path, sizes, steps):
    manifest = yaml.safe_load(manifest_path.read_text())
    manifest["model_sizes"] = {name: SIZES[name] for name in sizes}
    manifest["stages"] = {
        "pretrain": {"steps": steps, "batch_size": 8, "seq_len": 128, "learning_rate": 1e-3},
        "tokenizer": {"vocab_size": 1000},
    }
    manifest["gates"] = {"pretrain_val_loss": {"max": 7.0}}
    manifest_path.write_text(yaml.safe_dump(manifest))


def test_plan_prints_the_dag_and_the_estimate(manifest_path, capsys):
    with_training(manifest_path, ["small"], steps=100)
    assert main(["--manifest", str(manifest_path), "plan"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "raw_corpus" in out and "corpus_inventory" in out and "artifact_integrity" in out
    # 6·N·D: N = 2·(2·64² + 2·64·64 + 3·64·256) + 64·1000 = 195,072; D = 100·8·128 = 102,400.
    assert "195.07k" in out and "102.40k" in out and "119.85G" in out


def test_plan_refuses_a_plan_over_budget(manifest_path, capsys):
    with_training(manifest_path, ["small", "large"], steps=200_000)
    assert main(["--manifest", str(manifest_path), "plan"]) == EXIT_OVER_BUDGET
    captured = capsys.readouterr()
    assert "large" in captured.out
    assert "refused: the estimate exceeds budget.usd_cap" in captured.err


def test_plan_reports_manifest_errors_with_line(tmp_path, capsys):
    bad = tmp_path / "pipeline.yaml"
    bad.write_text((PROJECT_ROOT / "pipeline.yaml").read_text().replace("usd_cap:", "usd_capp:"))
    assert main(["--manifest", str(bad), "plan"]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "unknown field 'budget.usd_capp'; did you mean 'usd_cap'?" in err and f"{bad}:" in err


@pytest.mark.slow
# Two drives of the whole default graph: about 8 minutes while the other worker runs the rest of
# the suite on the same 2 cores, where the default 600 s cut it off once.
@pytest.mark.timeout(1200)
def test_quickstart_materializes_the_default_graph_then_hits_the_cache(tmp_path):
    """The README's main command, on the shipped manifest and the full stdlib corpus."""
    env = {
        **os.environ,
        "DAGSTER_HOME": str(tmp_path / "dagster_home"),
        "LLM_ASSETS_STORE": str(tmp_path / "artifacts"),
        "LLM_ASSETS_ALERTS_JSONL": str(tmp_path / "alerts.jsonl"),
    }
    env.pop("LLM_ASSETS_MANIFEST", None)
    cmd = [sys.executable, "-m", "llm_assets.cli", "materialize"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "0 cache hit(s)" in first.stdout and "corpus_inventory" in first.stdout
    assert (tmp_path / "dagster_home" / "dagster.yaml").exists()

    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    summary = [line for line in second.stdout.splitlines() if "materialization(s)" in line][0]
    total, hits = int(summary.split()[0]), int(summary.split(",")[1].split()[0])
    assert total == hits > 0, summary


@pytest.fixture
def cli(settings, tmp_path, monkeypatch) -> list[str]:
    """The CLI on a real instance of its own, as the README runs it."""
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LLM_ASSETS_STORE", settings.store_uri)
    monkeypatch.setenv("LLM_ASSETS_ALERTS_JSONL", settings.alerts_jsonl)
    return ["--manifest", settings.manifest]


def with_two_sources(manifest_path, *extra: dict, **fields) -> dict:
    """One stdlib shard (json/) and a folder of two text files: three corpus shards."""
    docs = manifest_path.parent / "docs"
    docs.mkdir(exist_ok=True)
    for name in ("a", "b"):
        (docs / f"{name}.txt").write_text(f"document {name} has a few words in it. " * 20)
    manifest = {**yaml.safe_load(manifest_path.read_text()), **fields}
    manifest["sources"] = [{"kind": "python_stdlib", "name": "stdlib", "include": ["json/*"], "shard_mb": 1.0},
                           {"kind": "local", "name": "docs", "paths": ["docs/*.txt"]}, *extra]
    manifest_path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return manifest


def corpus_partitions() -> list[str]:
    with dg.DagsterInstance.get() as instance:
        return list(instance.get_dynamic_partitions("corpus_shards"))


BAD_SOURCE = {"kind": "local", "name": "web", "paths": ["crawl/*.jsonl"]}


def test_a_source_that_matches_nothing_stops_materialize_with_one_line_and_no_traceback(cli, manifest_path, capsys):
    with_two_sources(manifest_path, BAD_SOURCE)
    assert main([*cli, "materialize", "--select", "key:raw_corpus"]) == EXIT_FAILED
    captured = capsys.readouterr()
    [line] = [line for line in captured.err.splitlines() if "source 'web'" in line]
    line_of_web = manifest_path.read_text().splitlines().index("  name: web")  # 0-based: the item starts above
    assert line.startswith(f"{manifest_path}:{line_of_web}: source 'web': '{manifest_path.parent}/crawl/*.jsonl' "
                           "matches no files;")
    assert "on_source_error: skip" in line and "Traceback" not in captured.err + captured.out
    assert corpus_partitions() == [], "nothing is registered, nothing runs"


def test_on_source_error_skip_ingests_the_healthy_sources_and_still_fails(cli, manifest_path, capsys):
    with_two_sources(manifest_path, BAD_SOURCE, on_source_error="skip")
    assert main([*cli, "materialize", "--select", "key:raw_corpus"]) == EXIT_FAILED
    captured = capsys.readouterr()
    built = {row.split()[1] for row in captured.out.splitlines() if row.startswith("raw_corpus ")}
    assert built == {"stdlib-0000", "docs-a.txt", "docs-b.txt"}
    assert "source skipped: " in captured.out  # said at the start
    [line] = [line for line in captured.err.splitlines() if "source 'web'" in line]  # and at the end
    assert line.startswith(f"source not ingested: {manifest_path}:") and "skipped (on_source_error: skip)" in line
    assert "FAILED runs" not in captured.err and "Traceback" not in captured.err


def test_partitions_prune_removes_the_partitions_of_a_removed_source(cli, manifest_path, capsys, monkeypatch):
    manifest = with_two_sources(manifest_path)
    assert main([*cli, "materialize", "--select", "key:raw_corpus"]) == EXIT_OK
    assert sorted(corpus_partitions()) == ["docs-a.txt", "docs-b.txt", "stdlib-0000"]

    # The folder source leaves the manifest: its partitions stay, and their runs fail, pointing at the command.
    manifest_path.write_text(yaml.safe_dump({**manifest, "sources": manifest["sources"][:1]}, sort_keys=False))
    capsys.readouterr()
    assert main([*cli, "materialize", "--select", "key:raw_corpus"]) == EXIT_FAILED
    captured = capsys.readouterr()
    assert ("2 corpus_shards partition(s) that no source produces any more (docs-a.txt, docs-b.txt): their runs "
            "will fail; remove them with `llm-assets partitions prune`") in captured.out
    run_id = captured.err.split("FAILED runs: ")[1].split()[0].rstrip(",")
    with dg.DagsterInstance.get() as instance:
        [failure] = instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_FAILURE)
    error, messages = failure.dagster_event.event_specific_data.error, []
    while error is not None:
        messages, error = [*messages, error.message], error.cause
    assert "`llm-assets partitions prune`" in "\n".join(messages)

    assert main([*cli, "partitions", "prune", "--dry-run"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "2 of 3 corpus_shards partition(s) no source produces:" in out
    assert "docs-a.txt  no source in the manifest produces it" in out and "dry run: nothing removed" in out
    assert len(corpus_partitions()) == 3
    # No terminal (CI) and no --yes: nothing is removed, and the command says how.
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main([*cli, "partitions", "prune"]) == EXIT_FAILED
    assert "pass --yes to remove them" in capsys.readouterr().err and len(corpus_partitions()) == 3

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stdin", Terminal("n\n"))
    assert main([*cli, "partitions", "prune"]) == EXIT_OK
    assert "nothing removed" in capsys.readouterr().out and len(corpus_partitions()) == 3

    assert main([*cli, "partitions", "prune", "--yes"]) == EXIT_OK
    assert "removed 2 partition(s) from corpus_shards" in capsys.readouterr().out
    assert corpus_partitions() == ["stdlib-0000"]
    assert main([*cli, "partitions", "prune", "--yes"]) == EXIT_OK
    assert "nothing to prune" in capsys.readouterr().out
    assert main([*cli, "materialize", "--select", "key:raw_corpus"]) == EXIT_OK
    assert "that no source produces" not in capsys.readouterr().out
    # The pruned shards' materializations stay in the event log; they are part of nothing any more.
    lock_path = manifest_path.parent / "run.lock.json"
    assert main([*cli, "lock", "--output", str(lock_path)]) == EXIT_OK
    locked = {(e["asset"], e["partition"]) for e in json.loads(lock_path.read_text())["assets"]}
    assert ("raw_corpus", "stdlib-0000") in locked and not any(p in ("docs-a.txt", "docs-b.txt") for _, p in locked)
    capsys.readouterr()
    assert main([*cli, "verify"]) == EXIT_OK
    assert "docs-a.txt" not in capsys.readouterr().out
