"""Through the CLI on a real instance: releases promoted as the SFT recipe changes, a rollback
from the SFT stage that restores the earlier release from cache, a release pointer moved back
by hash, the run lock, and its replay in a fresh store."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import yaml

from llm_assets.cli import main
from llm_assets.release_pointer import current_release
from llm_assets.store import open_store
from llm_assets_tests.conftest import SAFETY_GATES
from llm_assets_tests.posttrain.test_assets import EVALUATION, ONE_BATCH_EVALUATION, POSTTRAIN
from llm_assets_tests.pretrain.test_assets import with_training
from resources.handles import latest_materializations


def with_sft_and_release(manifest_path: Path, evaluation: dict = EVALUATION) -> dict:
    """Pretraining of one tiny size, SFT, evaluation: the release promotes the SFT model, and the
    server spec serves it."""
    with_training(manifest_path, steps=30)
    manifest = yaml.safe_load(manifest_path.read_text())
    manifest["model_sizes"] = {"xs": manifest["model_sizes"]["xs"]}
    manifest["stages"].update(sft={**POSTTRAIN["sft"], "steps": 12}, posttrain_data={"max_answer_chars": 160},
                              evaluation=evaluation, serving={"smoke_prompts": ["def parse(text):"]})
    manifest["gates"].update({"sft_val_loss": {"max": 8.0}, "heldout_perplexity.bits_per_byte": {"max": 8.0},
                              **SAFETY_GATES})
    manifest_path.write_text(yaml.safe_dump(manifest))
    return manifest


def served_release() -> str:
    """The release the current server spec of xs serves."""
    with dg.DagsterInstance.get() as instance:
        return latest_materializations(instance, dg.AssetKey("server_spec"), ["xs"])["xs"].metadata["release"].value


def outcomes(output: str) -> dict[str, str]:
    """asset -> hit/miss, from the table `materialize` and `rollback` print."""
    rows = [line.split() for line in output.splitlines()]
    return {row[0]: row[3] for row in rows if len(row) == 5 and row[3] in ("hit", "miss")}


def test_rollback_from_sft_restores_the_earlier_release_and_a_lock_replays(settings, manifest_path, tmp_path,
                                                                           monkeypatch, capsys):
    manifest = with_sft_and_release(manifest_path, ONE_BATCH_EVALUATION)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LLM_ASSETS_STORE", settings.store_uri)
    monkeypatch.setenv("LLM_ASSETS_ALERTS_JSONL", settings.alerts_jsonl)
    cli = ["--manifest", settings.manifest]
    store = open_store(settings.store_uri)

    assert main([*cli, "materialize"]) == 0
    first = current_release(store, "xs")
    assert first is not None and outcomes(capsys.readouterr().out)["release"] == "miss"
    assert served_release() == first

    # A new SFT recipe: the SFT model and what follows it are rebuilt; the new release replaces the first.
    changed = {**manifest,
               "stages": {**manifest["stages"], "sft": {**manifest["stages"]["sft"], "learning_rate": 1e-3}}}
    manifest_path.write_text(yaml.safe_dump(changed))
    # The SFT model rebuilt alone: the release refuses the report, which evaluated the model before.
    assert main([*cli, "materialize", "--select", "key:sft_model"]) == 0
    assert outcomes(capsys.readouterr().out) == {"sft_model": "miss"}
    assert main([*cli, "materialize", "--select", "key:release"]) != 0
    said = capsys.readouterr()
    assert "eval_report[xs] evaluated sft_model" in said.out + said.err and current_release(store, "xs") == first
    assert main([*cli, "materialize", "--select", "key:sft_model+"]) == 0
    assert set(outcomes(capsys.readouterr().out).items()) >= {("eval_report", "miss"), ("release", "miss"),
                                                              ("server_spec", "miss")}
    second = current_release(store, "xs")
    assert second not in (None, first) and served_release() == second

    # The recipe is put back and the graph rolled back from SFT: the same fingerprints, so every step
    # is a cache hit, nothing upstream of SFT runs, and the first release is current again.
    manifest_path.write_text(yaml.safe_dump(manifest))
    assert main([*cli, "rollback", "--from", "sft_model", "--partition", "xs"]) == 0
    out = capsys.readouterr().out
    assert "rematerializing eval_report, release, server_spec, sft_model; every other asset is reused" in out
    assert outcomes(out) == {"sft_model": "hit", "eval_report": "hit", "release": "hit", "server_spec": "hit"}
    assert current_release(store, "xs") == first and served_release() == first

    # The pointer moves back to the second release, by a prefix of its hash; the server spec follows
    # (its smoke test runs again).
    assert main([*cli, "rollback", "--release", second[:10]]) == 0
    out = capsys.readouterr().out
    assert f"moved from {first[:12]} back to {second[:12]}" in out and set(outcomes(out)) == {"server_spec"}
    assert current_release(store, "xs") == second and served_release() == second
    assert main([*cli, "releases"]) == 0
    history = capsys.readouterr().out
    assert history.count("promote") == 3 and f"{second[:12]}   rollback" in history
    assert main([*cli, "rollback", "--from", "sft_modle"]) == 1
    assert "did you mean 'sft_model'?" in capsys.readouterr().err
    assert main([*cli, "rollback", "--release", "abcdef12"]) == 1
    assert "no promoted release 'abcdef12'" in capsys.readouterr().err

    lock_path = tmp_path / "run.lock.json"
    assert main([*cli, "lock", "--output", str(lock_path)]) == 0
    lock = json.loads(lock_path.read_text())
    entries = {(e["asset"], e["partition"]): e for e in lock["assets"]}
    sft = entries[("sft_model", "xs")]
    assert sft["code_version"] == "1" and sft["git_commit"] and sft["wall_seconds"] > 0 and sft["cost_usd"] > 0
    assert {i["asset"] for i in sft["inputs"]} == {"pretrain_checkpoint", "sft_dataset"}
    assert all(entries[(i["asset"], i["partition"])]["sha256"] == i["sha256"] for i in sft["inputs"])
    gate = next(c for c in sft["checks"] if c["check"] == "sft_val_loss_gate")
    assert gate["status"] == "passed" and gate["values"]["sft_val_loss"] <= 8.0
    assert lock["releases"] == {"xs": second} and lock["manifest"]["name"] == manifest["name"]

    # Replayed into a fresh store: the data and tokenizer stages come out bit-identical, and so
    # (on the same machine) does the pretrained model.
    replay = ["replay", str(lock_path), "--workdir", str(tmp_path / "replay"), "--select", "+key:pretrain_checkpoint"]
    assert main(replay) == 0
    rows = [(cols[0], cols[2]) for cols in map(str.split, capsys.readouterr().out.splitlines())
            if len(cols) > 3 and cols[2] in ("identical", "equivalent", "different", "missing")]
    assert {"raw_corpus", "clean_corpus", "dedup_corpus", "dataset_splits", "tokenizer", "token_shards",
            "pretrain_checkpoint"} <= {asset for asset, _ in rows}
    assert all(status == "identical" for asset, status in rows if asset != "pretrain_checkpoint"), rows
    assert dict(rows)["pretrain_checkpoint"] in ("identical", "equivalent")
    assert main(replay) == 1  # the workdir is not fresh any more
    assert "is not empty" in capsys.readouterr().err
