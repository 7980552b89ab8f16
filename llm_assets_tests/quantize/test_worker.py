"""The quantization worker as the asset starts it, in its own environment: what it writes and
reports for each scheme, that the result is the same every time, and how it fails."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm_assets.quantize.assets import pick_texts, write_texts
from llm_assets.quantize.worker import (
    CALIBRATION_FILE,
    SUMMARY_FILE,
    QuantizeSpec,
    carry_over,
    heldout_quality,
    read_texts,
    token_sequences,
)
from resources.quantize_environment import _WORKERS, QuantizeEnvironmentResource

LINEAR_LAYERS = 14  # 2 decoder layers × (q, k, v, o, gate, up, down)


def tree_hashes(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir()) if p.is_file()}


def run_worker(python: str, spec: QuantizeSpec, cwd: Path) -> tuple[subprocess.CompletedProcess, dict | None]:
    spec_path = cwd / "spec.json"
    spec_path.write_text(spec.model_dump_json())
    done = subprocess.run([python, "-m", "llm_assets.quantize", "--spec", str(spec_path)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"event": "result"')]
    return done, results[0]["metadata"] if results else None


def spec_for(root: Path, model_dir: Path, heldout: pl.DataFrame, scheme: str, out: str) -> QuantizeSpec:
    texts = heldout["text"].to_list()
    return QuantizeSpec(
        scheme=scheme, model_dir=str(model_dir), out_dir=str(root / out), max_tokens=96, group_size=32,
        heldout=str(write_texts(root / "heldout.jsonl", texts)),
        calibration=str(write_texts(root / "calibration.jsonl", texts * 2)) if scheme == "gptq-4bit" else None,
        error_file=str(root / "error.txt"),
    )


@pytest.fixture(scope="module")
def gptq(quantize_python, trained_dir, heldout, tmp_path_factory) -> tuple[Path, dict, Path]:
    root = tmp_path_factory.mktemp("gptq")
    done, figures = run_worker(quantize_python, spec_for(root, trained_dir, heldout, "gptq-4bit", "out"), root)
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "out", figures, root


def test_gptq_writes_a_4_bit_model_transformers_loads_and_measures_it(gptq, trained_dir):
    out, figures, root = gptq
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (config["quant_method"], config["bits"], config["group_size"]) == ("gptq", 4, 32)
    # Measured on the reloaded directory: every linear layer of the decoder is a packed 4-bit one.
    assert figures["quantized_layers"] == LINEAR_LAYERS
    assert figures["bits"] == 4 and figures["heldout_tokens"] > 300
    assert figures["size_ratio"] < 0.4, figures  # embeddings and the head stay in full precision
    assert figures["quantized_weight_bytes"] < figures["full_precision_weight_bytes"]
    assert abs(figures["perplexity_increase"]) < 0.1, figures
    assert 0.8 < figures["top1_agreement"] < 1, figures  # 4 bits do change some predictions
    assert figures["perplexity_increase"] == pytest.approx(
        figures["quantized_perplexity"] / figures["full_precision_perplexity"] - 1, abs=1e-5)
    # The calibration set travels with the artifact, under the hash recorded for it.
    assert hashlib.sha256((out / CALIBRATION_FILE).read_bytes()).hexdigest() == figures["calibration_sha256"]
    assert figures["calibration_texts"] == 2 * 16
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["libraries"]["gptqmodel"] == "7.6.0" and len(summary["gptq_layer_losses"]) == LINEAR_LAYERS
    # The tokenizer is the model's own, byte for byte; gptqmodel's droppings stay out of the
    # artifact and out of the working directory.
    assert tree_hashes(out)["tokenizer.json"] == tree_hashes(trained_dir)["tokenizer.json"]
    assert tree_hashes(out)["tokenizer_config.json"] == tree_hashes(trained_dir)["tokenizer_config.json"]
    assert "quant_log.csv" not in tree_hashes(out)
    assert sorted(p.name for p in root.iterdir()) == ["calibration.jsonl", "heldout.jsonl", "out", "spec.json"]


def copy_model(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


@pytest.mark.parametrize("scheme", ["gptq-4bit", "int8"])
def test_quantization_is_deterministic(scheme, gptq, quantize_python, trained_dir, heldout, tmp_path):
    """The same model and texts, from another directory: the same bytes, so the same artifact hash
    wherever the store keeps its files."""
    elsewhere = copy_model(trained_dir, tmp_path / "elsewhere" / "model")
    runs = []
    for root, model_dir in ((tmp_path / "a", trained_dir), (tmp_path / "b", elsewhere)):
        root.mkdir()
        if scheme == "gptq-4bit" and root.name == "a":
            runs.append(tree_hashes(gptq[0]))  # the fixture's run
            continue
        done, _ = run_worker(quantize_python, spec_for(root, model_dir, heldout, scheme, "out"), root)
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(tree_hashes(root / "out"))
    assert runs[0] == runs[1]


def test_one_long_lived_worker_writes_the_same_bytes_and_survives_a_failure(quantize_python, trained_dir, heldout,
                                                                           tmp_path):
    """What the asset uses: one worker for every partition. A failed spec is answered with its
    error and the worker goes on; the next spec's result is the same bytes as a fresh process's."""
    environment = QuantizeEnvironmentResource(python=quantize_python)
    (tmp_path / "bad").mkdir()
    bad = spec_for(tmp_path / "bad", tmp_path / "no-model", heldout, "int8", "out")
    (tmp_path / "bad.json").write_text(bad.model_dump_json())
    with pytest.raises(dg.Failure, match=r"^quantizing bad failed: FileNotFoundError: .*no-model"):
        environment.quantize(tmp_path / "bad.json", print, Path(bad.error_file), "quantizing bad")
    worker = _WORKERS[quantize_python]

    served, fresh = tmp_path / "served", tmp_path / "fresh"
    for root in (served, fresh):
        root.mkdir()
    spec = spec_for(served, trained_dir, heldout, "int8", "out")
    (served / "spec.json").write_text(spec.model_dump_json())
    figures = environment.quantize(served / "spec.json", print, served / "error.txt", "quantizing int8")
    done, expected = run_worker(quantize_python, spec_for(fresh, trained_dir, heldout, "int8", "out"), fresh)
    assert done.returncode == 0, done.stderr[-3000:]
    assert tree_hashes(served / "out") == tree_hashes(fresh / "out")
    assert figures["quantized_layers"] == LINEAR_LAYERS and figures["libraries"] == expected["libraries"]["raw_value"]
    assert {k: v for k, v in figures.items() if k not in ("libraries", "quantize_seconds")} == \
        {k: v for k, v in expected.items() if k not in ("libraries", "quantize_seconds")}
    assert _WORKERS[quantize_python] is worker and worker.poll() is None, "one worker served both specs"


def test_a_spec_with_relative_paths_and_a_bad_text_file_fails_naming_the_line(quantize_python, trained_dir,
                                                                              tmp_path):
    (tmp_path / "heldout.jsonl").write_text('{"text": "fine"}\n{"text": 3\n')
    spec = QuantizeSpec(scheme="int8", model_dir=str(trained_dir), out_dir="out", heldout="heldout.jsonl",
                        max_tokens=32, error_file="error.txt")
    done, figures = run_worker(quantize_python, spec, tmp_path)
    assert done.returncode != 0 and figures is None
    first_line = (tmp_path / "error.txt").read_text().splitlines()[0]
    assert first_line.startswith(f"ValueError: {tmp_path / 'heldout.jsonl'}:2: expected a JSON object"), first_line


def test_int8_is_smaller_than_full_precision_and_close_to_it(quantize_python, trained_dir, heldout, tmp_path):
    done, figures = run_worker(quantize_python, spec_for(tmp_path, trained_dir, heldout, "int8", "out"), tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "torchao"
    assert figures["quantized_layers"] == LINEAR_LAYERS and figures["bits"] == 8
    assert 0.4 < figures["size_ratio"] < 0.7, figures  # int8 linears, fp32 embeddings and head
    assert abs(figures["perplexity_increase"]) < 0.01 and abs(figures["accuracy_drop"]) < 0.01, figures
    assert figures["top1_agreement"] > 0.95, figures
    assert "calibration_sha256" not in figures and not (tmp_path / "out" / CALIBRATION_FILE).exists()


def test_a_corrupted_model_fails_naming_the_file(quantize_python, trained_dir, heldout, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for source in trained_dir.iterdir():
        (broken / source.name).write_bytes(source.read_bytes())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    done, figures = run_worker(quantize_python, spec_for(tmp_path, broken, heldout, "int8", "out"), tmp_path)
    assert done.returncode != 0 and figures is None
    first_line = (tmp_path / "error.txt").read_text().splitlines()[0]
    assert f"{broken}: transformers cannot load the full-precision model (SafetensorError" in first_line
    assert "llm-assets verify" in first_line


# The pure parts, in this environment.

def test_read_texts_names_the_bad_line(tmp_path):
    path = tmp_path / "texts.jsonl"
    path.write_text('{"text": "fine"}\n{"txt": "typo"}\n')
    with pytest.raises(ValueError, match=r"texts.jsonl:2: expected a JSON object with a 'text' field"):
        read_texts(path)
    path.write_text("")
    with pytest.raises(ValueError, match="no texts"):
        read_texts(path)


def test_pick_texts_is_seeded_and_ignores_sharding(tmp_path):
    frame = pl.DataFrame({"id": [f"doc-{i}" for i in range(50)], "text": [f"text {i}" for i in range(50)]})
    frame.write_parquet(tmp_path / "one.parquet")
    frame[::-1][:20].write_parquet(tmp_path / "a.parquet")
    frame[::-1][20:].write_parquet(tmp_path / "b.parquet")
    picked = pick_texts([tmp_path / "one.parquet"], 10, seed=3)
    assert len(picked) == 10 and len(set(picked)) == 10
    assert pick_texts([tmp_path / "a.parquet", tmp_path / "b.parquet"], 10, seed=3) == picked
    assert pick_texts([tmp_path / "one.parquet"], 10, seed=4) != picked
    assert sorted(pick_texts([tmp_path / "one.parquet"], 500, seed=3)) == sorted(frame["text"].to_list())


def test_heldout_quality_is_the_models_own_loss(trained_dir, heldout):
    tokenizer = AutoTokenizer.from_pretrained(trained_dir)
    model = AutoModelForCausalLM.from_pretrained(trained_dir, dtype=torch.float32)
    sequences = token_sequences(tokenizer, heldout["text"].to_list(), max_tokens=64)
    assert sequences and all(2 <= len(s) <= 64 for s in sequences)
    quality, predictions = heldout_quality(model, sequences)
    with torch.no_grad():
        losses = [(model(input_ids=torch.tensor([s]), labels=torch.tensor([s])).loss.item(), len(s) - 1)
                  for s in sequences]
    assert quality.tokens == sum(n for _, n in losses)
    assert quality.nll == pytest.approx(sum(loss * n for loss, n in losses) / quality.tokens, rel=1e-5)
    assert 0 < quality.token_accuracy < 1 and quality.agreement is None
    # Against its own predictions a model agrees everywhere; against shifted ones, rarely.
    assert heldout_quality(model, sequences, predictions)[0].agreement == 1.0
    assert heldout_quality(model, sequences, [p.roll(1) for p in predictions])[0].agreement < 0.9
    with pytest.raises(ValueError, match="no held-out tokens"):
        heldout_quality(model, [])


def test_carry_over_copies_the_tokenizer_not_the_model(trained_dir, tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"quantized")
    (tmp_path / "config.json").write_text("{}")
    carry_over(trained_dir, tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == b"quantized"
    assert (tmp_path / "config.json").read_text() == "{}"
    assert (tmp_path / "tokenizer.json").read_bytes() == (trained_dir / "tokenizer.json").read_bytes()
