"""Step placement on Kubernetes, rendered offline and validated against the API schemas."""

from __future__ import annotations

import json
from dataclasses import replace

import dagster as dg
import kubernetes_validate
import pytest
from dagster_k8s import k8s_job_executor

from llm_assets.compute import (
    K8S_CONFIG_TAG,
    data_step_configs,
    k8s_op_tags,
    render_multinode_job,
    render_step_job,
)
from llm_assets.definitions import build_definitions
from llm_assets.manifest import StageCompute, TrainingCompute
from llm_assets_tests.quantize.test_assets import with_quantization

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
    executor = build_definitions(replace(settings, executor="k8s")).executor
    assert executor.name == k8s_job_executor.name == "k8s"
    assert executor.executor_creation_fn is k8s_job_executor.executor_creation_fn
    assert build_definitions(settings).executor is None  # in-process, on a laptop


def test_data_steps_get_the_manifests_data_compute(settings):
    """Steps whose asset carries no op tags (the data stages) get compute.data through the
    executor's per-step config; training steps keep their own tags."""
    defs = build_definitions(settings)
    data = StageCompute(cpu="2", memory="8Gi", node_selector={"pool": "cpu"})
    configs = data_step_configs(data, defs.assets)
    assert {"raw_corpus", "clean_corpus", "dedup_corpus", "dataset_splits", "token_shards"} <= configs.keys()
    job = render_step_job("clean_corpus", k8s_op_tags(data), image="llm-assets:1")
    validate(job)
    assert render_step_job("clean_corpus", {K8S_CONFIG_TAG: configs["clean_corpus"]}, image="llm-assets:1") == job
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["requests"] == {"cpu": "2", "memory": "8Gi"}
    assert pod["nodeSelector"] == {"pool": "cpu"}


def test_a_runs_executor_config_is_kept_and_wins_over_the_data_defaults(settings):
    job = build_definitions(replace(settings, executor="k8s")).resolve_implicit_global_asset_job_def()
    own = {"container_config": {"resources": {"requests": {"cpu": "5"}}}}
    resolved = dg.validate_run_config(job, {"execution": {"config": {
        "max_concurrent": 3, "job_namespace": "llm", "per_step_k8s_config": {"raw_corpus": own}}}})
    config = resolved["execution"]["k8s"]
    assert config["max_concurrent"] == 3 and config["job_namespace"] == "llm"
    per_step = config["per_step_k8s_config"]
    assert per_step["raw_corpus"]["container_config"] == own["container_config"]
    assert per_step["clean_corpus"]["container_config"]["resources"]["requests"] == {"cpu": "1", "memory": "4Gi"}
    with pytest.raises(dg.DagsterInvalidConfigError, match="max_concurent"):
        dg.validate_run_config(job, {"execution": {"config": {"max_concurent": 3}}})


def test_training_steps_keep_their_gpu_tags(settings, manifest_path):
    with_quantization(manifest_path)
    assets = {a.node_def.name: a for a in build_definitions(settings).assets}
    configs = data_step_configs(StageCompute(), assets.values())
    for name in ("pretrain_checkpoint", "quantized_model"):
        assert name not in configs
        # Dagster keeps op tag values as JSON strings.
        resources = json.loads(assets[name].node_def.tags[K8S_CONFIG_TAG])["container_config"]["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == "1"


def test_a_multi_node_training_step_is_an_indexed_job_with_a_rendezvous():
    compute = TrainingCompute(gpus=8, cpu="64", memory="512Gi", nodes=4, node_selector={"pool": "h100"})
    entry = ["-m", "llm_assets.pretrain", "--spec", "/shared/spec.json"]
    service, job = render_multinode_job("pretrain_checkpoint[7B]", compute, entry, image="llm-assets:1",
                                        namespace="llm")
    validate(service)
    validate(job)
    name = job["metadata"]["name"]
    assert name == service["metadata"]["name"] == "pretrain-checkpoint-7b"
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 4
    pod = spec["template"]["spec"]
    # Pod i is <job>-i.<service>: the headless Service, selecting the Job's pods, names pod 0 for every rank.
    assert pod["subdomain"] == name and service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    container = pod["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["MASTER_ADDR"]["value"] == f"{name}-0.{name}.llm.svc.cluster.local"
    assert env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']")
    command = container["command"]
    assert command[:3] == ["python", "-m", "torch.distributed.run"] and command[-4:] == entry
    assert {"--nnodes=4", "--nproc_per_node=8", "--node_rank=$(NODE_RANK)", "--master_addr=$(MASTER_ADDR)",
            "--master_port=$(MASTER_PORT)"} <= set(command)
    assert env["MASTER_PORT"]["value"] == str(service["spec"]["ports"][0]["port"])
    # Every node is a full training pod: GPUs, node pool, GPU toleration.
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert pod["nodeSelector"] == {"pool": "h100"} and pod["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_a_single_node_step_is_not_rendered_as_a_multi_node_job():
    with pytest.raises(ValueError, match="nodes is 1.*needs nodes >= 2"):
        render_multinode_job("pretrain_checkpoint", TrainingCompute(gpus=8), ["-m", "x"], image="i")


def test_a_misplaced_field_in_the_rendered_job_is_caught():
    # The schema check the rendering is validated with does catch a field the API does not know.
    _, job = render_multinode_job("p", TrainingCompute(gpus=1, nodes=2), ["-m", "x"], image="i")
    job["spec"]["template"]["spec"]["completionMode"] = "Indexed"  # belongs to the Job spec, not the pod
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(job)
