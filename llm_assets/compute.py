"""Kubernetes placement of steps: the `dagster-k8s/config` tag built from the manifest's compute."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from llm_assets.manifest import StageCompute

K8S_CONFIG_TAG = "dagster-k8s/config"
GPU_RESOURCE = "nvidia.com/gpu"
# GPU node pools are usually tainted so that only pods asking for GPUs land there.
GPU_TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}


def k8s_config(compute: StageCompute) -> dict[str, Any]:
    """The `dagster-k8s/config` value: container resources (GPUs as limits) and node placement."""
    requests = {"cpu": compute.cpu, "memory": compute.memory}
    limits: dict[str, str] = {"memory": compute.memory}
    if compute.gpus:
        # Extended resources must be limits (a request, if given, has to equal the limit).
        limits[GPU_RESOURCE] = str(compute.gpus)
    config: dict[str, Any] = {"container_config": {"resources": {"requests": requests, "limits": limits}}}
    pod_spec: dict[str, Any] = {}
    if compute.node_selector:
        pod_spec["node_selector"] = dict(compute.node_selector)
    if compute.gpus:
        pod_spec["tolerations"] = [dict(GPU_TOLERATION)]
    if pod_spec:
        config["pod_spec_config"] = pod_spec
    return config


def k8s_op_tags(compute: StageCompute) -> dict[str, Any]:
    return {K8S_CONFIG_TAG: k8s_config(compute)}


def requests_gpu(op_tags: dict[str, Any] | None) -> bool:
    """Whether a step with these op tags asks Kubernetes for a GPU (the limit `k8s_config` sets)."""
    config = (op_tags or {}).get(K8S_CONFIG_TAG) or {}
    limits = config.get("container_config", {}).get("resources", {}).get("limits", {})
    return int(limits.get(GPU_RESOURCE, 0) or 0) > 0


def data_step_configs(data: StageCompute, assets: Iterable[Any]) -> dict[str, dict[str, Any]]:
    """Per op name, the `compute.data` pod config for every asset whose op asks for nothing itself:
    the data stages, which are defined before any manifest is read and so carry no op tags."""
    return {asset.node_def.name: k8s_config(data) for asset in assets
            if K8S_CONFIG_TAG not in (asset.node_def.tags or {})}


def render_step_job(
    step_key: str, op_tags: dict[str, Any], *, image: str, namespace: str = "dagster"
) -> dict[str, Any]:
    """The Kubernetes Job that dagster-k8s would launch for a step, rendered offline as a dict."""
    import kubernetes
    from dagster_k8s.job import (
        DagsterK8sJobConfig,
        UserDefinedDagsterK8sConfig,
        construct_dagster_k8s_job,
        get_k8s_job_name,
    )

    job_config = DagsterK8sJobConfig(
        job_image=image, dagster_home="/opt/dagster/dagster_home", image_pull_policy="IfNotPresent",
        image_pull_secrets=[], service_account_name=None, instance_config_map="dagster-instance",
        postgres_password_secret=None, env_config_maps=[], env_secrets=[], env_vars=[],
        volume_mounts=[], volumes=[], labels={}, resources={}, scheduler_name=None, security_context={},
    )
    user_config = UserDefinedDagsterK8sConfig.from_dict(op_tags.get(K8S_CONFIG_TAG, {}))
    job = construct_dagster_k8s_job(
        job_config, ["dagster", "api", "execute_step"], get_k8s_job_name("run", step_key),
        user_defined_k8s_config=user_config, component="step_worker",
    )
    rendered = kubernetes.client.ApiClient().sanitize_for_serialization(job)
    rendered["metadata"]["namespace"] = namespace
    return rendered
