"""Kubernetes placement of steps: the `dagster-k8s/config` tag built from the manifest's compute,
and the indexed Job a training step spanning several machines runs as."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from llm_assets.manifest import StageCompute, TrainingCompute

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


RENDEZVOUS_PORT = 29500


def _dns_label(text: str) -> str:
    """`text` as a Kubernetes DNS-1123 label: lower case, [a-z0-9-], at most 63 characters."""
    label = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:63].rstrip("-")
    if not label:
        raise ValueError(f"{text!r} has no character a Kubernetes name can use")
    return label


def render_multinode_job(
    name: str, compute: TrainingCompute, entry: Sequence[str], *, image: str, namespace: str = "dagster"
) -> list[dict[str, Any]]:
    """One training step spanning `compute.nodes` machines: a headless Service and an indexed Job of
    that many pods, rendered offline as dicts.

    Pod i of the Job runs `torchrun --nnodes=N --node-rank=i` with `entry` (e.g. `-m llm_assets.pretrain
    --spec ...`) and `compute.processes(gpus)` ranks; the rendezvous is pod 0, which the Service gives
    a stable DNS name (`<job>-0.<service>`). Every pod has the step's resources, node selector and
    GPU toleration (`k8s_config`). The Job fails as a whole: one lost pod stops the rendezvous, and
    the step resumes from its last committed checkpoint.
    """
    if compute.nodes < 2:
        raise ValueError(f"compute.training.nodes is {compute.nodes}: a single-node step runs in its own step pod "
                         f"(render_step_job); a multi-node Job needs nodes >= 2")
    job_name = _dns_label(name)
    labels = {"app.kubernetes.io/name": "llm-assets", "app.kubernetes.io/component": "training",
              "llm-assets/training-job": job_name}
    config = k8s_config(compute)
    rank_env = {"name": "NODE_RANK", "valueFrom": {"fieldRef": {
        "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}}
    master = f"{job_name}-0.{job_name}.{namespace}.svc.cluster.local"
    command = ["python", "-m", "torch.distributed.run", f"--nnodes={compute.nodes}",
               f"--nproc_per_node={compute.processes(compute.gpus)}", "--node_rank=$(NODE_RANK)",
               "--master_addr=$(MASTER_ADDR)", "--master_port=$(MASTER_PORT)", *entry]
    container = {
        "name": "train", "image": image, "command": command,
        "env": [rank_env, {"name": "MASTER_ADDR", "value": master},
                {"name": "MASTER_PORT", "value": str(RENDEZVOUS_PORT)}],
        "ports": [{"containerPort": RENDEZVOUS_PORT, "name": "rendezvous"}],
        "resources": config["container_config"]["resources"],
    }
    pod_spec: dict[str, Any] = {"subdomain": job_name, "restartPolicy": "Never", "containers": [container]}
    placement = config.get("pod_spec_config", {})
    if "node_selector" in placement:
        pod_spec["nodeSelector"] = placement["node_selector"]
    if "tolerations" in placement:
        pod_spec["tolerations"] = placement["tolerations"]
    service = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": job_name, "namespace": namespace, "labels": labels},
        # Headless, and published before the pods are ready: the ranks resolve pod 0 while starting.
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": labels,
                 "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT}]},
    }
    job = {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": job_name, "namespace": namespace, "labels": labels},
        "spec": {"completionMode": "Indexed", "completions": compute.nodes, "parallelism": compute.nodes,
                 "backoffLimit": 0, "template": {"metadata": {"labels": labels}, "spec": pod_spec}},
    }
    return [service, job]
