"""The unigram baseline of eval_report's bits per byte.

It is lm-eval's own figure for a model that knows token frequencies and nothing else: a Llama
whose output is the unigram distribution whatever the context scores the same bits per byte
through lm-eval. The shipped gate (`heldout_perplexity.bits_per_byte` relative to it) fails such
a model through the real `eval_gates` check, and the asset after it does not run; a model that
learned the text passes. On a real instance, eval_report measures the baseline from the recorded
token shards and the release is held back.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest
import torch
import yaml
from tokenizers import Tokenizer

from llm_assets.definitions import build_definitions
from llm_assets.evaluation.assets import BASELINES_KEY, BITS_PER_BYTE, report_metadata, report_reader
from llm_assets.evaluation.harness import run_lm_eval
from llm_assets.evaluation.report import EvalReport
from llm_assets.evaluation.tasks import PERPLEXITY, perplexity_texts, write_builtin_tasks
from llm_assets.evaluation.unigram import shard_log_probs, unigram_bits_per_byte
from llm_assets.hf_models import save_hf
from llm_assets.manifest import load_manifest
from llm_assets.pretrain import build_model
from llm_assets.runner import materialize_graph
from llm_assets.store import open_store
from llm_assets_tests.checks.test_gates import manifest_with_gates, run_gate_check
from llm_assets_tests.evaluation.conftest import TINY, record_eval_inputs
from llm_assets_tests.evaluation.test_corrupt_model_input import with_evaluation

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PRETRAIN = {"steps": 1, "batch_size": 1, "seq_len": 8, "learning_rate": 1e-3}  # never run: the manifest needs one
MAX_DOCS, LIMIT = 12, 5


@pytest.fixture(scope="module")
def shipped_gates() -> dict[str, dict]:
    """The default manifest's gates (the bits-per-byte one measured from the unigram baseline):
    the tests judge with what ships."""
    gates = load_manifest(PROJECT_ROOT / "pipeline.yaml").gates
    assert gates[BITS_PER_BYTE].baseline == "unigram" and gates[BITS_PER_BYTE].max_delta < 0
    return {name: gate.model_dump(exclude_none=True, exclude_defaults=True) for name, gate in gates.items()}


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def task_dir(heldout: pl.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tasks")
    write_builtin_tasks(heldout, out, seed=0, max_docs=MAX_DOCS)
    return out


def unigram_model(log_probs: np.ndarray, tokenizer_dir: Path, out_dir: Path) -> Path:
    """A Llama that predicts the unigram distribution `log_probs` whatever the context: every token
    embeds to the all-ones vector (which the final RMSNorm keeps), attention and MLP add nothing,
    and the output layer maps that vector to the log-probabilities."""
    model = build_model(TINY.model_copy(update={"tie_embeddings": False}), seed=0)
    logits = torch.full((TINY.vocab_size,), -1e4)  # ids past the tokenizer's vocabulary never come
    logits[: len(log_probs)] = torch.from_numpy(log_probs)
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(1.0)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        model.lm_head.weight[:, 0] = logits
    return save_hf(model, out_dir, tokenizer_dir)


@pytest.fixture(scope="module")
def unigram_dir(shard_dir: Path, tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return unigram_model(shard_log_probs([shard_dir]), tokenizer_dir, tmp_path_factory.mktemp("unigram") / "model")


def _report_metadata(model_dir: Path, task_dir: Path, tokenizer: Tokenizer, log_probs: np.ndarray) -> dict:
    """eval_report's gate metadata for the model in `model_dir`, perplexity task only."""
    harness = run_lm_eval(model_dir, [PERPLEXITY], [task_dir], batch_size=8, limit=None, seed=0, bootstrap_iters=0)
    unigram = unigram_bits_per_byte(perplexity_texts(task_dir, None), tokenizer, log_probs)
    return report_metadata(EvalReport.from_harness(harness, baselines={BITS_PER_BYTE: {"unigram": unigram}}))


def test_the_unigram_figure_is_lm_evals_bits_per_byte_of_a_unigram_model(unigram_dir, shard_dir, task_dir,
                                                                          tokenizer) -> None:
    texts = perplexity_texts(task_dir, LIMIT)
    assert len(texts) == LIMIT < len(perplexity_texts(task_dir, None))  # lm-eval's limit: the first documents
    expected = unigram_bits_per_byte(texts, tokenizer, shard_log_probs([shard_dir]))
    measured = run_lm_eval(unigram_dir, [PERPLEXITY], [task_dir], batch_size=8, limit=LIMIT, seed=0,
                           bootstrap_iters=0)
    assert 1.0 < expected < 20.0
    assert measured.metrics[PERPLEXITY]["bits_per_byte"] == pytest.approx(expected, rel=1e-5)


def test_no_shard_is_no_baseline() -> None:
    with pytest.raises(ValueError, match="no token shard to count: the unigram baseline needs the training token"):
        shard_log_probs([])


def test_a_model_no_better_than_unigram_fails_the_shipped_gate(unigram_dir, trained_dir, shard_dir, task_dir,
                                                               tokenizer, shipped_gates, tmp_path) -> None:
    manifest = manifest_with_gates(shipped_gates, pretrain=PRETRAIN, evaluation={})
    log_probs = shard_log_probs([shard_dir])
    gate = [BITS_PER_BYTE]

    frequencies = _report_metadata(unigram_dir, task_dir, tokenizer, log_probs)
    judged = run_gate_check(tmp_path / "store", manifest, frequencies, gate, report_reader(gate), "eval_gates")
    assert not judged.passed and not judged.downstream_ran
    baseline = frequencies[BASELINES_KEY].value[BITS_PER_BYTE]["unigram"]
    assert f"xs: {BITS_PER_BYTE} {frequencies[BITS_PER_BYTE]:.4g} > unigram baseline {baseline:.4g} + max_delta" \
           in judged.description
    assert judged.metadata[f"gate_{BITS_PER_BYTE}_baseline"] == pytest.approx(baseline)

    learned = _report_metadata(trained_dir, task_dir, tokenizer, log_probs)
    passed = run_gate_check(tmp_path / "store", manifest, learned, gate, report_reader(gate), "eval_gates")
    assert passed.passed and passed.downstream_ran, passed.description

    # A report that measured no baseline (one from before eval_report's code version 3) cannot pass it.
    unmeasured = {BITS_PER_BYTE: learned[BITS_PER_BYTE]}
    judged = run_gate_check(tmp_path / "store", manifest, unmeasured, gate, report_reader(gate), "eval_gates")
    assert not judged.passed and not judged.downstream_ran
    assert "relative to the unigram baseline, which this check does not measure" in judged.description


def test_eval_report_measures_the_baseline_and_holds_the_release(settings, manifest_path, instance, unigram_dir,
                                                                 shard_dir, tokenizer, tokenizer_dir, heldout,
                                                                 shipped_gates, tmp_path) -> None:
    """The real asset on a real instance, its upstream artifacts recorded as materialized: the
    pretrained checkpoint is the unigram model of the recorded token shard."""
    with_evaluation(manifest_path)
    manifest = yaml.safe_load(manifest_path.read_text())
    manifest["gates"] = shipped_gates
    manifest_path.write_text(yaml.safe_dump(manifest))
    defs = build_definitions(settings)
    record_eval_inputs(defs, instance, open_store(settings.store_uri), unigram_dir, heldout, tokenizer_dir, shard_dir,
                       tmp_path)
    shards = instance.get_dynamic_partitions("corpus_shards")
    result = materialize_graph(defs, instance, selection="key:eval_report or key:release", log=lambda _: None)
    assert not result.success
    report = instance.get_latest_materialization_event(dg.AssetKey("eval_report")).asset_materialization.metadata
    # Every recorded shard counted; every perplexity document the recipe writes scored (it sets no limit).
    tasks = tmp_path / "tasks"
    write_builtin_tasks(heldout, tasks, seed=manifest["seed"], max_docs=manifest["stages"]["evaluation"]["max_docs"])
    counted = shard_log_probs([shard_dir] * len(shards))
    expected = unigram_bits_per_byte(perplexity_texts(tasks, None), tokenizer, counted)
    assert report[BASELINES_KEY].value == {BITS_PER_BYTE: {"unigram": pytest.approx(expected, rel=1e-9)}}
    # The model of one shard's frequencies, judged against all of them: no better than unigram.
    assert report[BITS_PER_BYTE].value == pytest.approx(expected, rel=0.05)
    assert "## Baselines" in report["report"].value
    key = dg.AssetCheckKey(dg.AssetKey("eval_report"), "eval_gates")
    check = instance.event_log_storage.get_latest_asset_check_execution_by_key([key])[key].event
    verdict = check.dagster_event.event_specific_data
    assert not verdict.passed and "> unigram baseline" in verdict.description
    assert instance.get_latest_materialization_event(dg.AssetKey("release")) is None
