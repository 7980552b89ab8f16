"""The canary on Kubernetes, rendered offline: two Deployments (current, candidate) and a Gateway API
HTTPRoute whose backend weights split the traffic, each manifest validated strictly."""

from __future__ import annotations

import json

import dagster as dg
import jsonschema
import kubernetes_validate
import pytest
import yaml

from llm_assets.definitions import build_resources
from llm_assets.manifest import CanaryRecipe, ServingRecipe, load_manifest
from llm_assets.release_pointer import RELEASE_JSON, promote_or_propose
from llm_assets.serving.assets import build_defs as serving_build_defs
from llm_assets.serving.httproute import validate_route
from llm_assets.serving.spec import render_canary, render_manifests
from llm_assets.settings import Settings
from llm_assets_tests.canary.test_canary_report import SIZE, canary_manifest
from resources.handles import ArtifactHandle, handle_metadata

CURRENT, CANDIDATE = "ab" * 32, "cd" * 32


def test_the_candidate_gets_its_own_deployment_and_the_route_splits_by_the_manifest_fraction():
    recipe = ServingRecipe(canary=CanaryRecipe(fraction=0.1, gateway="edge"))
    current = render_manifests(recipe, "tiny-0.4m", CURRENT, "llm-assets:1", "s3://b/p")
    *candidate, route = render_canary(recipe, "tiny-0.4m", CANDIDATE, "llm-assets:1", "s3://b/p")
    for resource in (*current, *candidate):
        kubernetes_validate.validate(resource, "1.31", strict=True)
    validate_route(route)

    stable, canary = current[0], candidate[0]
    assert (stable["metadata"]["name"], canary["metadata"]["name"]) == ("llm-tiny-0-4m", "llm-tiny-0-4m-candidate")
    fetch = canary["spec"]["template"]["spec"]["initContainers"][0]
    assert fetch["command"][-2:] == [CANDIDATE, "/model"]  # the candidate pod fetches the candidate's model
    assert candidate[1]["spec"]["selector"] == {"app.kubernetes.io/instance": "llm-tiny-0-4m-candidate"}
    assert current[1]["spec"]["selector"] == {"app.kubernetes.io/instance": "llm-tiny-0-4m"}
    assert route["spec"]["parentRefs"] == [{"name": "edge"}] and route["spec"]["hostnames"] == ["llm.example.com"]
    backends = route["spec"]["rules"][0]["backendRefs"]
    assert [(b["name"], b["weight"]) for b in backends] == [("llm-tiny-0-4m", 900), ("llm-tiny-0-4m-candidate", 100)]
    assert {b["name"] for b in backends} == {current[1]["metadata"]["name"], candidate[1]["metadata"]["name"]}


@pytest.mark.parametrize("break_it, complaint", [
    (lambda r: r["spec"]["rules"][0]["backendRefs"][1].update(weight=2_000_000),
     r"backendRefs.1.weight: 2000000 is greater than the maximum of 1000000"),
    (lambda r: r["spec"]["rules"][0]["backendRefs"][0].update(weigth=10), "'weigth' was unexpected"),
    (lambda r: r["spec"].update(hostnames=["LLM_example"]), "does not match"),
    (lambda r: [b.update(weight=0) for b in r["spec"]["rules"][0]["backendRefs"]], "every weight is 0"),
])
def test_a_broken_route_is_refused_naming_the_field(break_it, complaint):
    *_, route = render_canary(ServingRecipe(canary=CanaryRecipe()), "xs", CANDIDATE, "i", "s3://b/p")
    break_it(route)
    with pytest.raises(jsonschema.ValidationError, match=complaint):
        validate_route(route)


def test_rendering_a_canary_needs_one_in_the_manifest():
    with pytest.raises(ValueError, match="needs stages.serving.canary"):
        render_canary(ServingRecipe(), "xs", CANDIDATE, "i", "s3://b/p")


def test_server_spec_renders_the_candidate_and_its_route_while_one_is_proposed(tmp_path, manifest_path, instance):
    """The real server_spec asset and its manifests_validate check, for a proposed candidate."""
    log_dir = tmp_path / "logs"
    manifest = load_manifest(str(canary_manifest(manifest_path, log_dir)))
    resources = build_resources(Settings(str(manifest_path), str(tmp_path / "artifacts"), str(tmp_path / "a.jsonl"),
                                         None, None), manifest)
    store = resources["artifact_store"].get_store()
    releases = []
    for n in range(2):
        (tmp_path / f"model-{n}").mkdir()
        (tmp_path / f"model-{n}" / "config.json").write_text(json.dumps({"n": n}))
        model = store.put_dir(tmp_path / f"model-{n}").sha256
        (tmp_path / f"release-{n}").mkdir()
        (tmp_path / f"release-{n}" / RELEASE_JSON).write_text(json.dumps(
            {"model": {"asset": "policy", "partition": SIZE, "sha256": model}}))
        releases.append((store.put_dir(tmp_path / f"release-{n}").sha256, model))
    promote_or_propose(store, SIZE, releases[0][0], canary=True, by="run 1")
    promote_or_propose(store, SIZE, releases[1][0], canary=True, by="run 2")
    defs = serving_build_defs(manifest)
    [spec_asset] = defs.assets
    [validate] = [c for c in defs.asset_checks if any(k.name == "manifests_validate" for k in c.check_keys)]
    handle = ArtifactHandle("release", SIZE, "release", releases[1][0], store.ref(releases[1][0]).uri, 10)
    instance.report_runless_asset_event(dg.AssetMaterialization("release", partition=SIZE,
                                                                metadata=handle_metadata(handle)))
    release = dg.AssetSpec("release", partitions_def=spec_asset.partitions_def).with_io_manager_key("artifact_io")
    result = dg.materialize([release, spec_asset, validate], selection=[spec_asset.key], partition_key=SIZE,
                            instance=instance, resources=resources, raise_on_error=False)
    [verdict] = result.get_asset_check_evaluations()
    assert verdict.passed and verdict.metadata["manifests"].value == 7, verdict.description
    [mat] = result.get_asset_materialization_events()
    spec = yaml.safe_load(store.read_bytes(mat.materialization.metadata["sha256"].value, "server_spec.yaml"))
    assert spec["release"] == releases[0][0] and spec["canary"]["release"] == releases[1][0]
    assert spec["canary"]["model_sha256"] == releases[1][1] and spec["canary"]["fraction"] == 0.2
    route = yaml.safe_load(store.read_bytes(mat.materialization.metadata["sha256"].value, "httproute.yaml"))
    assert [b["weight"] for b in route["spec"]["rules"][0]["backendRefs"]] == [800, 200]
