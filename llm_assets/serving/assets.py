"""server_spec: how the current release of a model size is served (the release pointer's, which
`llm-assets rollback --release` may have moved back). The spec (endpoint, model
hash, serving config, observability) and the Kubernetes manifests for GPU nodes are the artifact;
two blocking checks guard it: the manifests validate against the Kubernetes API schemas, and a
smoke test runs the real server on 127.0.0.1 with the released model.
"""

from pathlib import Path

import dagster as dg
import jsonschema
import kubernetes_validate
import yaml

from llm_assets.artifacts import InputRead, artifact_asset, materialize_artifact, verify_inputs
from llm_assets.checks.scope import artifacts_under_check
from llm_assets.manifest import PipelineManifest
from llm_assets.release_pointer import (
    READS_RELEASE_POINTER,
    RELEASE_JSON,
    candidate_release,
    current_release,
    read_release,
)
from llm_assets.serving.httproute import validate_route
from llm_assets.serving.spec import CANARY_FILES, render_canary, render_manifests, spec_document
from resources.artifact_store_resource import ArtifactStoreResource
from resources.handles import ArtifactHandle
from resources.pipeline import PipelineResource

SPEC_FILE = "server_spec.yaml"
K8S_VERSION = "1.31"
FETCH_IMAGE = "llm-assets:latest"  # the project's image (Dockerfile): its fetch module verifies the model


def build_defs(manifest: PipelineManifest) -> dg.Definitions:
    if manifest.stages.serving is None or manifest.stages.evaluation is None or not manifest.model_sizes:
        return dg.Definitions()
    model_sizes = dg.StaticPartitionsDefinition(sorted(manifest.model_sizes))

    @artifact_asset(
        partitions_def=model_sizes, code_version="2", kinds={"kubernetes", "openai"}, group_name="serving",
        tags=READS_RELEASE_POINTER,
        description="Endpoint, model hash, serving config and observability of the release, with its vLLM "
                    "Deployment, Service and autoscaler for GPU nodes.",
    )
    def server_spec(context: dg.AssetExecutionContext, pipeline: PipelineResource,
                          artifact_store: ArtifactStoreResource, release: ArtifactHandle) -> dg.Output[ArtifactHandle]:
        store, recipe = artifact_store.get_store(), pipeline.load().stages.serving
        # What is served is the size's current release: after `llm-assets rollback --release`, an
        # earlier one than the latest materialization of `release`.
        current = current_release(store, context.partition_key) or release.sha256
        # Read on every run (they decide the fingerprint), so verified on every run: the release
        # document, and the model's manifest (its URI; the server_smoke check verifies its files).
        step = f"server_spec[{context.partition_key}]"
        verify_inputs(store, step, [InputRead("release", context.partition_key, current, (RELEASE_JSON,))])
        model = read_release(store, current)["model"]
        model_sha = model["sha256"]
        verify_inputs(store, step, [InputRead(model["asset"], model["partition"], model_sha, ())])
        model_uri = store.ref(model_sha).uri
        store_uri = artifact_store.uri
        # With a canary, the candidate the release step proposed is rendered next to it.
        candidate = candidate_release(store, context.partition_key) if recipe.canary is not None else None
        if candidate is not None:
            verify_inputs(store, step, [InputRead("release", context.partition_key, candidate, (RELEASE_JSON,))])
            candidate_model = read_release(store, candidate)["model"]
            verify_inputs(store, step, [InputRead(candidate_model["asset"], candidate_model["partition"],
                                                  candidate_model["sha256"], ())])

        def build(out: Path) -> dict:
            spec = spec_document(recipe, context.partition_key, model_sha, current, model_uri)
            manifests = render_manifests(recipe, context.partition_key, model_sha, FETCH_IMAGE, store_uri)
            if candidate is not None:
                spec["canary"] = {"release": candidate, "model_sha256": candidate_model["sha256"],
                                  "fraction": recipe.canary.fraction, "route": "httproute.yaml"}
                spec["manifests"] += CANARY_FILES
                manifests += render_canary(recipe, context.partition_key, candidate_model["sha256"], FETCH_IMAGE,
                                           store_uri)
            (out / SPEC_FILE).write_text(yaml.safe_dump(spec, sort_keys=False))
            for filename, resource in zip(spec["manifests"], manifests, strict=True):
                (out / filename).write_text(yaml.safe_dump(resource, sort_keys=False))
            return {"endpoint": spec["endpoint"], "model_sha256": model_sha, "release": current,
                    "manifests": dg.MetadataValue.md("\n\n".join(
                        f"`{name}`\n```yaml\n{yaml.safe_dump(doc, sort_keys=False)}```"
                        for name, doc in zip(spec["manifests"], manifests, strict=True)))}

        return materialize_artifact(context, store, kind="server_spec", build=build,
                                    config={"recipe": recipe, "store": store_uri, "release": current,
                                            **({"candidate": candidate} if candidate else {})},
                                    inputs={"release": release},
                                    input_files={"release": ()})  # read above, the current release's

    @dg.asset_check(asset=server_spec, blocking=True, partitions_def=model_sizes,
                    description=f"Every rendered manifest validates against the Kubernetes {K8S_VERSION} "
                                "schemas (strict); a canary's HTTPRoute against the Gateway API's.")
    def manifests_validate(context: dg.AssetCheckExecutionContext,
                           artifact_store: ArtifactStoreResource) -> dg.AssetCheckResult:
        store, problems, checked = artifact_store.get_store(), [], 0
        for handle, _ in artifacts_under_check(context, server_spec.key, True, store):
            spec = yaml.safe_load(store.read_bytes(handle.sha256, SPEC_FILE))
            for filename in spec["manifests"]:
                resource = yaml.safe_load(store.read_bytes(handle.sha256, filename))
                try:
                    if resource.get("kind") == "HTTPRoute":  # a CRD: not in the bundled Kubernetes schemas
                        validate_route(resource)
                    else:
                        kubernetes_validate.validate(resource, K8S_VERSION, strict=True)
                    checked += 1
                except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as exc:
                    problems.append(f"{handle.label} {filename}: {exc}")
        return dg.AssetCheckResult(passed=checked > 0 and not problems, severity=dg.AssetCheckSeverity.ERROR,
                                   description="; ".join(problems) or f"{checked} manifest(s) valid",
                                   metadata={"manifests": checked})

    @dg.asset_check(asset=server_spec, blocking=True, partitions_def=model_sizes,
                    description="Starts the server on 127.0.0.1 with the released model, sends the manifest's "
                                "smoke prompts, checks auth, the model hash and the answers, and stops it.")
    def server_smoke(context: dg.AssetCheckExecutionContext, pipeline: PipelineResource,
                     artifact_store: ArtifactStoreResource) -> dg.AssetCheckResult:
        from llm_assets.serving.smoke import smoke_test  # the server and torch load with the check

        store, recipe = artifact_store.get_store(), pipeline.load().stages.serving
        problems, metadata = [], {}
        for handle, _ in artifacts_under_check(context, server_spec.key, True, store):
            model_sha = yaml.safe_load(store.read_bytes(handle.sha256, SPEC_FILE))["model"]["sha256"]
            result = smoke_test(store.local_dir(model_sha, verify=True), model_sha, recipe.smoke_prompts)
            problems += [f"{handle.label}: {p}" for p in result.problems]
            metadata = {"model_sha256": model_sha, "requests": len(recipe.smoke_prompts),
                        "seconds": round(result.seconds, 2),
                        "answers": dg.MetadataValue.json(dict(zip(recipe.smoke_prompts, result.answers)))}
        return dg.AssetCheckResult(passed=bool(metadata) and not problems, severity=dg.AssetCheckSeverity.ERROR,
                                   description="; ".join(problems) or "the server answers from the released model",
                                   metadata=metadata)

    return dg.Definitions(assets=[server_spec], asset_checks=[manifests_validate, server_smoke])
