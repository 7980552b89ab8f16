"""The server spec's Kubernetes manifests, rendered offline and validated against the API schemas."""

import kubernetes_validate
import pytest

from llm_assets.manifest import ServingRecipe
from llm_assets.serving.spec import render_manifests, resource_name, spec_document

SHA = "ab" * 32


def test_the_rendered_deployment_serves_the_verified_model_on_gpus_and_validates():
    recipe = ServingRecipe(gpus_per_replica=2, min_replicas=2, max_replicas=6, max_batch_size=16)
    deployment, service, autoscaler = render_manifests(recipe, "tiny-0.4m", SHA, "llm-assets:1", "s3://b/p")
    for resource in (deployment, service, autoscaler):
        kubernetes_validate.validate(resource, "1.31", strict=True)
    assert (
        deployment["metadata"]["name"] == service["metadata"]["name"] == resource_name("tiny-0.4m") == "llm-tiny-0-4m"
    )
    pod = deployment["spec"]["template"]["spec"]
    fetch, server = pod["initContainers"][0], pod["containers"][0]
    assert fetch["command"][-2:] == [SHA, "/model"] and fetch["env"] == [{"name": "LLM_ASSETS_STORE", "value": "s3://b/p"}]
    assert server["resources"]["limits"] == {"nvidia.com/gpu": "2"}
    assert server["args"][server["args"].index("--served-model-name") + 1] == SHA
    assert server["args"][server["args"].index("--max-num-seqs") + 1] == "16"
    assert deployment["metadata"]["annotations"]["llm-assets/model-sha256"] == SHA
    assert deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert (autoscaler["spec"]["minReplicas"], autoscaler["spec"]["maxReplicas"]) == (2, 6)
    spec = spec_document(recipe, "tiny-0.4m", SHA, "cd" * 32, "s3://b/p/objects/" + SHA)
    assert spec["service"] == "http://llm-tiny-0-4m.llm-serving.svc.cluster.local/v1"
    assert spec["model"]["sha256"] == SHA and spec["release"] == "cd" * 32


def test_a_serving_recipe_with_fewer_max_than_min_replicas_is_refused():
    with pytest.raises(ValueError, match="max_replicas 1 is below min_replicas 2"):
        ServingRecipe(min_replicas=2, max_replicas=1)
