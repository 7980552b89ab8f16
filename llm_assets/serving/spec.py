"""The server spec of a release, and the Kubernetes manifests that serve it on GPU nodes.

The manifests run vLLM's OpenAI-compatible server (the same API as `llm-assets serve`) on the
released model. An init container fetches the model from the artifact store by its hash with
our own image (`python -m llm_assets.serving.fetch`), which verifies every file against the
artifact's manifest: a pod never serves bytes other than the ones the release recorded.

With a canary (`stages.serving.canary` and a proposed candidate), the candidate release gets its
own Deployment, Service and autoscaler (`<name>-candidate`) and a Gateway API HTTPRoute splits the
endpoint's requests between the two Services by weight (llm_assets/serving/httproute.py).
"""

from __future__ import annotations

import re
from typing import Any

from llm_assets.compute import GPU_RESOURCE, GPU_TOLERATION
from llm_assets.manifest import ServingRecipe
from llm_assets.serving.httproute import render_route

PORT = 8000
SECRET = "llm-serving-secrets"  # API key (VLLM_API_KEY) and the store's credentials, made with kubectl
MODEL_DIR = "/model"
CANARY_FILES = ["candidate-deployment.yaml", "candidate-service.yaml", "candidate-autoscaler.yaml", "httproute.yaml"]


def resource_name(model_size: str) -> str:
    """A DNS-1035 label for the size's Deployment, Service and autoscaler."""
    return "llm-" + re.sub(r"[^a-z0-9]+", "-", model_size.lower()).strip("-")


def render_manifests(recipe: ServingRecipe, model_size: str, model_sha256: str, fetch_image: str,
                     store_uri: str, candidate: bool = False) -> list[dict[str, Any]]:
    """Deployment (vLLM on GPUs, the model fetched and verified by hash), Service, autoscaler; of
    the canary's candidate release (`<name>-candidate`) when `candidate`."""
    name = resource_name(model_size) + ("-candidate" if candidate else "")
    labels = {"app.kubernetes.io/name": "llm-server", "app.kubernetes.io/instance": name,
              "llm-assets/model": model_sha256[:12], **({"llm-assets/canary": "candidate"} if candidate else {})}
    metadata = {"name": name, "namespace": recipe.namespace, "labels": labels,
                "annotations": {"llm-assets/model-sha256": model_sha256}}
    volume = {"name": "model", "mountPath": MODEL_DIR}
    secrets = [{"secretRef": {"name": SECRET}}]
    fetch = {
        "name": "fetch-model", "image": fetch_image,
        "command": ["python", "-m", "llm_assets.serving.fetch", model_sha256, MODEL_DIR],
        "env": [{"name": "LLM_ASSETS_STORE", "value": store_uri}], "envFrom": secrets, "volumeMounts": [volume],
    }
    server = {
        "name": "vllm", "image": recipe.image,
        "args": ["--model", MODEL_DIR, "--served-model-name", model_sha256, "--port", str(PORT),
                 "--max-num-seqs", str(recipe.max_batch_size)],
        "envFrom": secrets,  # VLLM_API_KEY: vLLM then requires the bearer token
        "ports": [{"name": "http", "containerPort": PORT}],
        "resources": {"limits": {GPU_RESOURCE: str(recipe.gpus_per_replica)}},
        "readinessProbe": {"httpGet": {"path": "/health", "port": PORT}, "periodSeconds": 5},
        "volumeMounts": [volume],
    }
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": metadata,
        "spec": {
            "replicas": recipe.min_replicas,
            "selector": {"matchLabels": {"app.kubernetes.io/instance": name}},
            "template": {
                # Prometheus scrapes vLLM's /metrics (latency, tokens/s, queue) from every replica.
                "metadata": {"labels": labels, "annotations": {
                    "prometheus.io/scrape": "true", "prometheus.io/port": str(PORT), "prometheus.io/path": "/metrics"}},
                "spec": {"initContainers": [fetch], "containers": [server],
                         "volumes": [{"name": "model", "emptyDir": {}}],
                         "nodeSelector": {"nvidia.com/gpu.present": "true"}, "tolerations": [dict(GPU_TOLERATION)]},
            },
        },
    }
    service = {
        "apiVersion": "v1", "kind": "Service", "metadata": metadata,
        "spec": {"selector": {"app.kubernetes.io/instance": name},
                 "ports": [{"name": "http", "port": 80, "targetPort": PORT}]},
    }
    autoscaler = {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": metadata,
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": recipe.min_replicas, "maxReplicas": recipe.max_replicas,
            "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {
                "type": "Utilization", "averageUtilization": recipe.target_cpu_utilization}}}],
        },
    }
    return [deployment, service, autoscaler]


def render_canary(recipe: ServingRecipe, model_size: str, candidate_sha256: str, fetch_image: str,
                  store_uri: str) -> list[dict[str, Any]]:
    """The candidate's Deployment, Service and autoscaler, and the HTTPRoute that sends
    `recipe.canary.fraction` of the endpoint's requests to it (weights in parts per 1000)."""
    if recipe.canary is None:
        raise ValueError("render_canary needs stages.serving.canary")
    name = resource_name(model_size)
    candidate = render_manifests(recipe, model_size, candidate_sha256, fetch_image, store_uri, candidate=True)
    share = min(max(round(recipe.canary.fraction * 1000), 1), 999)  # both releases keep some traffic
    route = render_route(name, recipe.namespace, recipe.host, recipe.canary.gateway,
                         [(name, 1000 - share), (f"{name}-candidate", share)])
    return [*candidate, route]


def spec_document(recipe: ServingRecipe, model_size: str, model_sha256: str, release_sha256: str,
                model_uri: str) -> dict[str, Any]:
    """What a client and an operator need to know about the endpoint of this release."""
    name = resource_name(model_size)
    return {
        "model_size": model_size,
        "endpoint": f"https://{recipe.host}/v1",
        "service": f"http://{name}.{recipe.namespace}.svc.cluster.local/v1",
        "model": {"sha256": model_sha256, "uri": model_uri, "served_model_name": model_sha256},
        "release": release_sha256,
        "serving": {"image": recipe.image, "gpus_per_replica": recipe.gpus_per_replica,
                    "replicas": [recipe.min_replicas, recipe.max_replicas], "max_tokens": recipe.max_tokens,
                    "max_batch_size": recipe.max_batch_size, "auth": f"bearer token (secret {SECRET}: VLLM_API_KEY)"},
        "observability": {"metrics": "/metrics (Prometheus; pods annotated for scraping)",
                          "health": "/health", "local_logs": "llm-assets serve --log-dir"},
        "manifests": ["deployment.yaml", "service.yaml", "autoscaler.yaml"],
    }
