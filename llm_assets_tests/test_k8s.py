"""Step placement on Kubernetes, rendered offline and validated against the API schemas."""

from __future__ import annotations

from dataclasses import replace

import kubernetes_validate
import pytest
from dagster_k8s import k8s_job_executor

from llm_assets.compute import k8s_op_tags, render_step_job
from llm_assets.definitions import build_definitions
from llm_assets.manifest import StageCompute

K8S_VERSION = "1.31"


def validate(resource: dict) -> None:
    kubernetes_validate.validate(resource, K8S_VERSION, strict=True)


def test_a_gpu_step_job_requests_gpus_and_validates():
    tags = k8s_op_tags(StageCompute(gpus=4, cpu="16", memory="128Gi", node_selector={"pool": "h100"}))
    job = render_step_job("pretrain_checkpoint", tags, image="registry.example/llm-assets:1")
    validate(job)
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert container["resources"]["requests"] == {"cpu": "16", "memory": "128Gi"}
    assert pod["nodeSelector"] == {"pool": "h100"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert container["image"] == "registry.example/llm-assets:1"


def test_a_data_step_job_is_cpu_only_and_validates():
    job = render_step_job("clean_corpus", k8s_op_tags(StageCompute()), image="llm-assets:1")
    validate(job)
    resources = job["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in resources.get("limits", {})


def test_strict_validation_catches_a_misplaced_field():
    """The validator is not a rubber stamp: a GPU count in the wrong place is refused."""
    job = render_step_job("x", k8s_op_tags(StageCompute(gpus=1)), image="i")
    job["spec"]["template"]["spec"]["containers"][0]["gpus"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(job)


def test_on_kubernetes_each_step_runs_in_its_own_pod(settings):
    """LLM_ASSETS_EXECUTOR=k8s (the Helm values set it) selects the executor that applies op tags."""
    assert build_definitions(replace(settings, executor="k8s")).executor is k8s_job_executor
    assert build_definitions(settings).executor is not k8s_job_executor
