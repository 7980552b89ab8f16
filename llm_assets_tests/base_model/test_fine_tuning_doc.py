"""The 7B manifest of docs/fine-tuning.md loads, plans, and its GPU steps' pods render and validate
against the Kubernetes API schemas, as the project's other manifests are checked."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from llm_assets.cli import EXIT_OK, main
from llm_assets.compute import K8S_CONFIG_TAG, render_step_job
from llm_assets.definitions import build_definitions
from llm_assets.manifest import load_manifest
from llm_assets_tests.test_k8s import K8S_VERSION

DOC = Path(__file__).parents[2] / "docs" / "fine-tuning.md"


def doc_manifest() -> str:
    """The YAML block that follows the `fine-tuning-manifest` marker."""
    found = re.search(r"<!-- fine-tuning-manifest -->\n```yaml\n(.*?)```", DOC.read_text(), re.DOTALL)
    assert found, f"{DOC}: no ```yaml block after <!-- fine-tuning-manifest -->"
    return found.group(1)


@pytest.fixture
def doc_manifest_path(tmp_path) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(doc_manifest())
    return path


def test_the_7b_manifest_trains_lora_in_bf16_on_gpu_pods_that_validate(settings, doc_manifest_path, capsys):
    manifest = load_manifest(doc_manifest_path)
    assert list(manifest.base_model_sizes) == ["qwen-7b"] and not manifest.pretrained_sizes
    assert (manifest.stages.sft.method, manifest.stages.sft.precision) == ("lora", "bf16")

    defs = build_definitions(replace(settings, manifest=str(doc_manifest_path), executor="k8s"))
    assets = {a.node_def.name: a for a in defs.assets}
    # A base model is not pretrained here, nor tokenized with the project's tokenizer.
    assert not {"pretrain_checkpoint", "scaling_law", "tokenizer", "token_shards"} & assets.keys()
    for name in ("sft_model", "eval_report", "quantized_model"):
        job = render_step_job(name, {K8S_CONFIG_TAG: json.loads(assets[name].node_def.tags[K8S_CONFIG_TAG])},
                              image="registry.example/llm-assets:1")
        kubernetes_validate.validate(job, K8S_VERSION, strict=True)
        pod = job["spec"]["template"]["spec"]
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1", name
        assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
        assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"

    assert main(["--manifest", str(doc_manifest_path), "plan"]) == EXIT_OK
    assert "not estimated until imported" in capsys.readouterr().out


def test_a_base_model_manifest_without_sft_that_evaluates_is_refused(doc_manifest_path):
    manifest = yaml.safe_load(doc_manifest_path.read_text())
    del manifest["stages"]["sft"], manifest["gates"]["sft_val_loss"]
    doc_manifest_path.write_text(yaml.safe_dump(manifest))
    with pytest.raises(Exception, match=r"base-model sizes qwen-7b are trained from stages.sft on: add it"):
        load_manifest(doc_manifest_path)
