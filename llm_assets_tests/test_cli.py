"""`llm-assets plan` and `llm-assets materialize`, as a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys

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
