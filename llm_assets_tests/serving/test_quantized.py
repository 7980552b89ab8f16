"""Serving a quantized model: the int8 artifact through the real server, and the lookup of the
quantized_model artifact made from the released model."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import dagster as dg
import pytest
from torchao.utils import TorchAOBaseTensor

from llm_assets.quantize.worker import carry_over, quantize_int8
from llm_assets.serving import ServeConfig, create_app, running
from llm_assets.serving.quantized import (
    QUANTIZED_MODEL,
    QuantizedModelNotFoundError,
    quantized_model_sha256,
    quantized_partition,
)
from llm_assets.store import open_store

MODEL_A, MODEL_B = "a" * 64, "b" * 64


def test_the_int8_model_serves_a_completion_through_the_server(trained_dir: Path, tmp_path: Path) -> None:
    # As the quantize worker writes it (TorchAoConfig(Int8WeightOnlyConfig())), the tokenizer alongside.
    quantized = tmp_path / "int8"
    quantize_int8(trained_dir, quantized)
    carry_over(trained_dir, quantized)
    store = open_store(str(tmp_path / "store"))
    sha256 = store.put_dir(quantized).sha256
    log_dir = tmp_path / "logs"
    app = create_app(store.local_dir(sha256, verify=True), sha256,
                     ServeConfig(max_tokens=8, log_dir=log_dir, release="r" * 64, scheme="int8"))
    model = app.state.engine.model
    assert isinstance(model.model.layers[0].mlp.up_proj.weight, TorchAOBaseTensor)  # the int8 weights are served
    with running(app) as url:
        request = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(
            {"prompt": "def add(a, b):", "max_tokens": 8, "temperature": 0}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
    assert answer["model"] == sha256
    assert answer["usage"]["completion_tokens"] >= 1 and answer["choices"][0]["finish_reason"] in {"stop", "length"}
    records = [json.loads(line) for path in sorted(log_dir.glob("requests-*.jsonl*"))
               for line in path.read_text().splitlines()]
    assert [(r["model"], r["scheme"], r["status"]) for r in records] == [(sha256, "int8", 200)]


def _quantized(instance: dg.DagsterInstance, model_sha256: str, artifact_sha256: str) -> None:
    instance.report_runless_asset_event(dg.AssetMaterialization(
        QUANTIZED_MODEL, partition=str(quantized_partition("tiny-1m", "int8")),
        metadata={"sha256": artifact_sha256, "model_sha256": model_sha256}))


def test_the_quantized_model_of_the_released_model_is_served_not_the_latest() -> None:
    with dg.DagsterInstance.ephemeral() as instance:
        _quantized(instance, MODEL_A, "1" * 64)
        _quantized(instance, MODEL_B, "2" * 64)  # the latest: a newer model, not (or no longer) released
        assert quantized_model_sha256(instance, "tiny-1m", "int8", MODEL_A) == "1" * 64  # after a rollback to A
        assert quantized_model_sha256(instance, "tiny-1m", "int8", MODEL_B) == "2" * 64


def test_a_release_whose_model_was_never_quantized_is_refused_with_what_to_materialize() -> None:
    with dg.DagsterInstance.ephemeral() as instance:
        with pytest.raises(QuantizedModelNotFoundError, match=r"never materialized.*llm-assets materialize"):
            quantized_model_sha256(instance, "tiny-1m", "int8", MODEL_A)
        _quantized(instance, MODEL_B, "2" * 64)  # a newer model was quantized; the released one was not
        with pytest.raises(QuantizedModelNotFoundError, match=r"quantized_model\[tiny-1m\|int8\] was made from "
                                                              r"model aaaaaaaaaaaa \(its materializations quantize "
                                                              r"model\(s\) bbbbbbbbbbbb\)"):
            quantized_model_sha256(instance, "tiny-1m", "int8", MODEL_A)
