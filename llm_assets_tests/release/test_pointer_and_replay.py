"""The release pointer, the lock file and the replay comparison, without Dagster."""

import json

import pytest

from llm_assets.lock import LockError, read_lock
from llm_assets.release_pointer import (
    RELEASE_JSON,
    ReleaseError,
    current_release,
    find_promoted,
    move_release,
    release_history,
)
from llm_assets.replay import DIFFERENT, EQUIVALENT, IDENTICAL, MISSING, compare_locks
from llm_assets.store import open_store


def test_promotions_move_the_pointer_and_every_release_stays_addressable(tmp_path):
    store = open_store(str(tmp_path / "store"))
    shas = []
    for n in range(2):
        src = tmp_path / f"r{n}"
        src.mkdir()
        (src / RELEASE_JSON).write_text(f'{{"n": {n}}}')
        shas.append(store.put_dir(src).sha256)
    assert current_release(store, "xs") is None
    move_release(store, "xs", shas[0], "promote", "run a")
    moved = move_release(store, "xs", shas[1], "promote", "run b")
    assert moved.previous == shas[0] and current_release(store, "xs") == shas[1]
    assert current_release(store, "s") is None  # sizes have their own pointer

    back = move_release(store, "xs", find_promoted(store, shas[0][:8]).sha256, "rollback", "ana")
    assert current_release(store, "xs") == shas[0] and back.previous == shas[1]
    assert [(m.action, m.sha256) for m in release_history(store, "xs")] == [
        ("promote", shas[0]), ("promote", shas[1]), ("rollback", shas[0])]
    with pytest.raises(ReleaseError, match="no promoted release 'ffffff'; promoted releases: xs"):
        find_promoted(store, "ffffff")
    with pytest.raises(ReleaseError, match="at least 6 characters"):
        find_promoted(store, shas[0][:3])
    with pytest.raises(ReleaseError, match="not in the artifact store"):
        move_release(store, "xs", "0" * 64, "rollback", "ana")


def _entry(asset, sha, group, partition=None, gates=None, inputs=()):
    checks = [{"check": "gate", "gates": sorted(gates), "values": gates}] if gates else []
    return {"asset": asset, "partition": partition, "group": group, "sha256": sha, "checks": checks,
            "inputs": [{"asset": a, "partition": p, "sha256": "x"} for a, p in inputs]}


def test_replay_comparison_is_strict_for_data_and_tolerant_for_training():
    recorded = {"assets": [
        _entry("clean_corpus", "a" * 64, "data"),
        _entry("tokenizer", "b" * 64, "tokenizer"),
        _entry("pretrain_checkpoint", "c" * 64, "pretrain", "xs", {"pretrain_val_loss": 5.00}),
        _entry("sft_model", "d" * 64, "posttrain", "xs", {"sft_val_loss": 4.0}),
        _entry("scaling_law", "e" * 64, "pretrain", inputs=[("pretrain_checkpoint", "xs")]),
        _entry("policy", "f" * 64, "posttrain", "xs"),
    ]}
    replayed = {"assets": [
        _entry("clean_corpus", "a" * 64, "data"),
        _entry("tokenizer", "9" * 64, "tokenizer"),
        _entry("pretrain_checkpoint", "8" * 64, "pretrain", "xs", {"pretrain_val_loss": 5.04}),
        _entry("sft_model", "7" * 64, "posttrain", "xs", {"sft_val_loss": 4.8}),
        _entry("scaling_law", "6" * 64, "pretrain", inputs=[("pretrain_checkpoint", "xs")]),
    ]}
    rows = {r.asset: r for r in compare_locks(recorded, replayed, rtol=0.05)}
    assert rows["clean_corpus"].status == IDENTICAL
    assert rows["tokenizer"].status == DIFFERENT and "must be bit-identical" in rows["tokenizer"].detail
    assert rows["pretrain_checkpoint"].status == EQUIVALENT and "(0.8%)" in rows["pretrain_checkpoint"].detail
    assert rows["sft_model"].status == DIFFERENT and "sft_val_loss 4 -> 4.8 (16.7%)" in rows["sft_model"].detail
    assert rows["scaling_law"].status == EQUIVALENT  # no figure of its own; its input is equivalent
    assert rows["policy"].status == MISSING and not rows["policy"].ok


def test_a_malformed_lock_is_refused_naming_what_is_wrong(tmp_path):
    path = tmp_path / "run.lock.json"
    with pytest.raises(LockError, match="no such lock file"):
        read_lock(path)
    path.write_text("{not json")
    with pytest.raises(LockError, match="not a JSON run lock"):
        read_lock(path)
    entry = {"asset": "policy", "partition": "xs", "group": "posttrain", "sha256": "a" * 64, "inputs": [],
             "checks": [], "overrides": [{"gate": "policy_kl"}]}
    path.write_text(json.dumps(
        {"format": 1, "manifest": {}, "assets": [{k: v for k, v in entry.items() if k != "checks"}]}
    ))
    with pytest.raises(LockError, match=r"assets\[0\] lacks checks"):
        read_lock(path)
    path.write_text(json.dumps({"format": 1, "manifest": {}, "assets": [entry]}))
    with pytest.raises(LockError, match=r"assets\[0\] \(policy\) has a malformed override"):
        read_lock(path)


def test_a_small_difference_figure_drifts_against_its_gates_scale():
    """A quantized model's perplexity increase is itself a difference near zero: +0.07% then
    -0.05% is a 170% change relative to the figures, 1.2% relative to the gate's 10%."""
    def quantized(sha: str, increase: float) -> dict:
        values = {"quantized_perplexity_increase": increase, "gate_quantized_perplexity_increase_max": 0.1,
                  "gate_quantized_perplexity_increase_min": None}
        return {"asset": "quantized_model", "partition": "xs|gptq-4bit", "group": "quantize", "sha256": sha,
                "checks": [{"check": "quantization_quality", "gates": ["quantized_perplexity_increase"],
                            "values": values}], "inputs": []}

    def status(after: float) -> str:
        return compare_locks({"assets": [quantized("a" * 64, 0.0007)]},
                             {"assets": [quantized("b" * 64, after)]}, rtol=0.05)[0].status

    assert status(-0.0005) == EQUIVALENT
    assert status(0.02) == DIFFERENT  # 1.93 points of a 10-point gate: 19%
