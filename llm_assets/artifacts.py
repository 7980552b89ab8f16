"""Fingerprints and early cutoff: the one way every asset turns work into a stored artifact.

An asset body calls :func:`materialize_artifact` with its recipe, its input handles and a
``build`` function that writes files into a directory. If the same fingerprint was built before
and its object still verifies, the stored artifact is returned without calling ``build``.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import BaseModel

from llm_assets.compute import requests_gpu
from llm_assets.cost_gate import check_budget, cost_metadata, cpu_seconds, step_gpus, step_manifest
from llm_assets.settings import code_revision
from llm_assets.store import (
    MANIFEST_NAME,
    ArtifactCorruptError,
    ArtifactManifest,
    ArtifactNotFoundError,
    ArtifactStore,
    ArtifactStoreError,
    VerifyReport,
    hash_file,
)
from llm_assets.tracing import REPORTED_PHASES, StepTrace, step_trace
from llm_assets.tracking import (
    TAG_ARTIFACT_SHA256,
    TAG_ARTIFACT_URI,
    TAG_ASSET,
    TAG_ATTEMPT,
    TAG_CODE_VERSION,
    TAG_DAGSTER_RUN,
    TAG_FINGERPRINT,
    TAG_GIT_COMMIT,
    TAG_PARTITION,
    TrackedRun,
    flatten_params,
)
from resources.handles import (
    META_BUILD_SECONDS,
    META_FINGERPRINT,
    META_GIT_COMMIT,
    META_INPUT_BYTES_VERIFIED,
    META_INPUT_VERIFY_SECONDS,
    META_INPUTS,
    ArtifactHandle,
    handle_metadata,
)
from resources.tracking import TrackingResource

Inputs = Mapping[str, ArtifactHandle | Mapping[str, ArtifactHandle]]
BuildFn = Callable[[Path], Mapping[str, Any] | None]


def canonical_json(value: Any) -> str:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def flatten_inputs(inputs: Inputs) -> list[ArtifactHandle]:
    """Every input handle, sorted by (asset, partition) so order of arguments never matters."""
    handles: list[ArtifactHandle] = []
    for value in inputs.values():
        handles.extend(value.values() if isinstance(value, Mapping) else [value])
    return sorted(handles, key=lambda h: (h.asset, h.partition or ""))


def fingerprint(
    asset: str,
    partition: str | None,
    code_version: str | None,
    config: Any,
    input_hashes: list[str],
) -> str:
    """sha256 of everything that determines an artifact: same fingerprint, same artifact."""
    body = {
        "asset": asset,
        "partition": partition,
        "code_version": code_version,
        "config": json.loads(canonical_json(config)),
        "inputs": sorted(input_hashes),
    }
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()


# The lifecycle's parts: an asset's group_name, and its `stage` tag.
STAGES = ("data", "tokenizer", "pretrain", "posttrain", "evaluation", "quantize", "release", "serving")
# Who answers for each part's assets (shown in the UI, selectable as `owner:"team:ml-platform"`).
# One team owns the whole lifecycle today; give a part its own team here.
STAGE_OWNERS = {stage: "team:ml-platform" for stage in STAGES}


def asset_tags(group_name: str, op_tags: Mapping[str, Any] | None) -> dict[str, str]:
    """The tags every asset carries: `stage` (its group) and `compute` (`gpu` when its step asks
    Kubernetes for a GPU through `llm_assets.compute.k8s_op_tags`, else `cpu`)."""
    if group_name not in STAGES:
        raise ValueError(f"group_name {group_name!r} is not a lifecycle stage ({', '.join(STAGES)})")
    return {"stage": group_name, "compute": "gpu" if requests_gpu(dict(op_tags or {})) else "cpu"}


def artifact_asset(**kwargs: Any) -> Callable:
    """``@dg.asset`` for assets whose output is an artifact handle: they all use the artifact IO
    manager, which passes handles (never data) to their children. Each gets its stage's owner and
    the `stage` and `compute` tags (:func:`asset_tags`), derived from ``group_name`` and
    ``op_tags``; owners or tags given by the caller are added to those."""
    group = kwargs.get("group_name")
    if group is None:
        raise ValueError("artifact_asset needs a group_name: the lifecycle stage the asset belongs to")
    tags = asset_tags(group, kwargs.get("op_tags"))  # refuses a group that is not a stage
    kwargs["owners"] = list(dict.fromkeys([STAGE_OWNERS[group], *kwargs.get("owners", [])]))
    kwargs["tags"] = {**tags, **kwargs.get("tags", {})}
    decorate = dg.asset(io_manager_key="artifact_io", **kwargs)
    return lambda fn: decorate(_asking_for_tracking(fn))


def _asking_for_tracking(fn: Callable) -> Callable:
    """``fn`` with a ``tracking: TrackingResource`` parameter, so that Dagster hands every artifact
    asset the tracking resource that ``materialize_artifact`` reads from the context, without each
    asset naming it (one that names it is left as it is)."""
    # Annotations resolved in fn's own module: Dagster resolves the wrapper's in this one.
    signature = inspect.signature(fn, eval_str=True)
    if "tracking" in signature.parameters:
        return fn

    @functools.wraps(fn)
    def asset_fn(*args: Any, tracking: TrackingResource, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    params = list(signature.parameters.values())
    at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
    params.insert(at, inspect.Parameter("tracking", inspect.Parameter.KEYWORD_ONLY, annotation=TrackingResource))
    asset_fn.__signature__ = signature.replace(parameters=params)
    asset_fn.__annotations__ = {**{p.name: p.annotation for p in params}, "return": signature.return_annotation}
    return asset_fn


# -- inputs are verified before they are used ----------------------------------------------------
# The hash gates re-check what a step wrote; these check what a step reads. A step reads its
# inputs from the store by the hash its parent's materialization recorded (the handle), so before
# the build runs, every file it will read is re-hashed and compared with that object's manifest,
# whose own hash must be the recorded one: a corrupt input fails the step before anything is built.


@dataclass(frozen=True)
class InputRead:
    """An artifact a step reads: the asset (and partition) it is the artifact of, the hash that
    was recorded for it (by the parent's materialization, or the release pointer), and the files
    the step reads of it: ``None`` for every file, ``()`` for none (its manifest is still checked)."""

    asset: str
    partition: str | None
    sha256: str
    files: tuple[str, ...] | None = None

    @classmethod
    def of(cls, handle: ArtifactHandle, files: Sequence[str] | None = None) -> InputRead:
        return cls(handle.asset, handle.partition, handle.sha256, None if files is None else tuple(files))

    @property
    def label(self) -> str:
        return self.asset if self.partition is None else f"{self.asset}[{self.partition}]"


def _problem(read: InputRead, path: str, expected: str, actual: str, what: str) -> dict[str, str]:
    return {"input": read.label, "artifact": read.sha256, "file": path,
            "expected_sha256": expected, "actual_sha256": actual, "problem": what}


def _open_read(store: ArtifactStore, read: InputRead) -> tuple[list[dict[str, str]], Path | None, dict[str, Any]]:
    """The object's manifest, checked against the recorded hash, and the local directory the step
    reads its files from; or the problems that stop there."""
    try:
        manifest = store.manifest(read.sha256)
    except ArtifactNotFoundError:
        return [_problem(read, MANIFEST_NAME, read.sha256, "missing", "the artifact is not in the store")], None, {}
    except ArtifactStoreError:  # the manifest does not hash to the recorded hash, or does not parse
        data = store.backend.read_manifest_bytes(read.sha256)
        try:  # its hash as the store computes it (of its canonical form), else of its bytes
            actual = ArtifactManifest.from_bytes(data).sha256 if data is not None else "missing"
        except ArtifactStoreError:
            actual = hashlib.sha256(data).hexdigest()
        problem = _problem(read, MANIFEST_NAME, read.sha256, actual, "the manifest does not hash to the recorded hash")
        return [problem], None, {}
    entries = {entry.path: entry for entry in manifest.files}
    try:  # in place for a local store; for S3 the download cache (fetched, hash-checked, on first use)
        return [], store.backend.local_files_dir(read.sha256) or store.local_dir(read.sha256), entries
    except ArtifactCorruptError as exc:  # S3: a downloaded file did not match the manifest
        found = []
        for text in exc.problems:
            path = text.split(":", 1)[0]
            expected, actual = (entries[path].sha256, _stored_digest(store, read.sha256, path)) if path in entries \
                else ("", "")
            found.append(_problem(read, path, expected, actual, "the download was refused"))
        return found, None, entries
    except (ArtifactStoreError, FileNotFoundError) as exc:  # S3: a file of the object is gone
        return [_problem(read, "", "", "", f"could not be fetched: {exc}")], None, entries


def _unlisted(root: Path) -> list[str]:
    """Every file under ``root``, relative: what a step that globs the artifact could read."""
    found = []
    for dirpath, _, filenames in os.walk(root):
        base = Path(dirpath).relative_to(root).as_posix()
        found.extend(name if base == "." else f"{base}/{name}" for name in filenames)
    return found


PARALLEL_HASH_BYTES = 16 << 20
"""From this many bytes in several files on, inputs are hashed on a few threads (below it,
starting them costs about what they save)."""


def _hash_files(paths: Sequence[Path], total_bytes: int) -> list[tuple[str, int] | None]:
    """sha256 and size of each file (None if it is gone); on a few threads when there is much to
    hash in several files: hashing and reading release the GIL, and the build has not started."""

    def one(path: Path) -> tuple[str, int] | None:
        try:
            return hash_file(path)
        except FileNotFoundError:
            return None

    if len(paths) < 2 or total_bytes < PARALLEL_HASH_BYTES:
        return [one(path) for path in paths]
    with ThreadPoolExecutor(max_workers=min(len(paths), os.cpu_count() or 1, 8)) as pool:
        return list(pool.map(one, paths))


def _check_reads(store: ArtifactStore, reads: Sequence[InputRead]) -> tuple[list[dict[str, str]], int]:
    problems, jobs = [], []
    for read in reads:
        found, root, entries = _open_read(store, read)
        problems.extend(found)
        if root is None:
            continue
        for path in sorted(entries) if read.files is None else sorted(set(read.files)):
            if path in entries:
                jobs.append((read, entries[path], root / path))
            else:
                problems.append(_problem(read, path, "", "", "the step reads a file the artifact does not have"))
        if read.files is None:  # a step that reads a whole artifact may glob it
            problems.extend(_problem(read, path, "", hash_file(root / path)[0], "a file the manifest does not list")
                            for path in sorted(_unlisted(root)) if path not in entries)
    hashed = 0
    digests = _hash_files([path for _, _, path in jobs], sum(entry.bytes for _, entry, _ in jobs))
    for (read, entry, _), digest in zip(jobs, digests, strict=True):
        if digest is None:
            problems.append(_problem(read, entry.path, entry.sha256, "missing", "the file is missing"))
            continue
        actual, size = digest
        hashed += size
        if actual != entry.sha256 or size != entry.bytes:
            problems.append(_problem(read, entry.path, entry.sha256, actual,
                                     f"{size} bytes, the manifest says {entry.bytes}" if size != entry.bytes
                                     else "same size, other content"))
    return sorted(problems, key=lambda p: (p["input"], p["file"])), hashed


def input_problems(store: ArtifactStore, read: InputRead) -> tuple[list[dict[str, str]], int]:
    """Re-hash the files of ``read`` a step is about to read (where it reads them: in place for a
    local store, the download cache for S3) against the object's manifest, itself checked against
    the recorded hash. Returns one record per mismatch (input, file, expected and actual sha256,
    what is wrong) and the number of bytes hashed."""
    return _check_reads(store, [read])


def _stored_digest(store: ArtifactStore, artifact_hash: str, path: str) -> str:
    """The sha256 of a file as the backend holds it (for S3, what a refused download held)."""
    digest = hashlib.sha256()
    try:
        for chunk in store.backend.iter_file(artifact_hash, path):
            digest.update(chunk)
    except FileNotFoundError:
        return "missing"
    return digest.hexdigest()


def _merged(reads: Iterable[InputRead]) -> list[InputRead]:
    """One read per artifact: a handle given twice (or partly, then whole) is hashed once."""
    merged: dict[str, InputRead] = {}
    for read in reads:
        seen = merged.get(read.sha256)
        if seen is not None and (seen.files is None or read.files is None):
            read = InputRead(seen.asset, seen.partition, seen.sha256, None)
        elif seen is not None:
            read = InputRead(seen.asset, seen.partition, seen.sha256, tuple(sorted({*seen.files, *read.files})))
        merged[read.sha256] = read
    return sorted(merged.values(), key=lambda r: (r.asset, r.partition or ""))


def describe_input_problem(p: Mapping[str, str]) -> str:
    if p["file"] == MANIFEST_NAME:
        return (f"{p['input']}: {MANIFEST_NAME}: expected sha256 {p['expected_sha256']} (recorded by its "
                f"materialization), actual {p['actual_sha256']} ({p['problem']})")
    if not p["file"]:
        return f"{p['input']} {p['artifact'][:12]}: {p['problem']}"
    if p["expected_sha256"] and p["actual_sha256"]:
        return (f"{p['input']} {p['artifact'][:12]}: {p['file']}: expected sha256 {p['expected_sha256']} "
                f"(its manifest), actual {p['actual_sha256']} ({p['problem']})")
    return f"{p['input']} {p['artifact'][:12]}: {p['file']}: {p['problem']}"


def verify_inputs(store: ArtifactStore, step: str, reads: Iterable[InputRead]) -> int:
    """Raise ``dg.Failure`` unless every file ``step`` reads of ``reads`` matches the hash recorded
    for it; returns the number of bytes hashed. Call it before the step reads anything."""
    problems, hashed = _check_reads(store, _merged(reads))
    if not problems:
        return hashed
    parents = sorted({p["input"].split("[", 1)[0] for p in problems})
    raise dg.Failure(
        description=(
            f"{step} did not run: {len(problems)} file(s) of its inputs do not match the hashes recorded for them:\n"
            + "\n".join(f"  {describe_input_problem(p)}" for p in problems[:20])
            + ("\n  …" if len(problems) > 20 else "")
            + "\nNothing was built and nothing recorded. The stored input is corrupt: `llm-assets verify` lists "
            "every corrupt artifact; rematerialize "
            + " and ".join(parents)
            + f" (`llm-assets materialize --select '{' or '.join(f'key:{a}' for a in parents)}'`: a copy that fails "
            "verification is rebuilt and replaced), then this step."
        ),
        metadata={"corrupt_inputs": dg.MetadataValue.json(problems)},
        allow_retries=False,
    )


def _input_reads(inputs: Inputs, files: Mapping[str, Sequence[str]]) -> list[InputRead]:
    reads = []
    for name, value in inputs.items():
        for handle in value.values() if isinstance(value, Mapping) else [value]:
            reads.append(InputRead.of(handle, files.get(name)))
    return reads


# The objects that verified in the current run, by URI: a run re-hashes an object once, not once
# for the cache hit that reuses it and again for its integrity gate. Only the latest run's are kept.
_VERIFIED_IN_RUN: dict[str, set[str]] = {}


def verify_once(store: ArtifactStore, run_id: str, artifact_hash: str) -> VerifyReport:
    """``store.verify``, remembered for the rest of the run when the object verifies (a failure is
    looked at again by whoever asks next)."""
    uri = store.backend.object_uri(artifact_hash)
    if uri in _VERIFIED_IN_RUN.get(run_id, ()):
        return VerifyReport(artifact_hash, ())
    report = store.verify(artifact_hash)
    if report.ok:
        if run_id not in _VERIFIED_IN_RUN:
            _VERIFIED_IN_RUN.clear()
        _VERIFIED_IN_RUN.setdefault(run_id, set()).add(uri)
    return report


def part_digest(store: ArtifactStore, handle: ArtifactHandle, relpath: str, remedy: str) -> str:
    """The sha256 of one file of an artifact: what a step reading only that part fingerprints
    (with the artifact itself passed as a narrowed input). The manifest it comes from must hash to
    the handle's recorded hash."""
    try:
        entries = store.manifest(handle.sha256).files
    except ArtifactStoreError:
        verify_inputs(store, f"reading {relpath} of {handle.label}", [InputRead.of(handle, ())])
        raise
    for entry in entries:
        if entry.path == relpath:
            return entry.sha256
    raise dg.Failure(f"{handle.label} {handle.sha256[:12]} has no {relpath}; {remedy}")


def fingerprint_of(context: dg.AssetExecutionContext, config: Any = None, inputs: Inputs | None = None) -> str:
    """The fingerprint ``materialize_artifact`` will use for this step, for work that must key
    its own progress (resumable training) by it."""
    return fingerprint(
        context.asset_key.to_user_string(),
        context.partition_key if context.has_partition_key else None,
        context.assets_def.code_versions_by_key.get(context.asset_key),
        config,
        [h.sha256 for h in flatten_inputs(inputs or {})],
    )


def materialize_artifact(
    context: dg.AssetExecutionContext,
    store: ArtifactStore,
    *,
    kind: str,
    build: BuildFn,
    config: Any = None,
    inputs: Inputs | None = None,
    narrowed_inputs: Inputs | None = None,
    input_files: Mapping[str, Sequence[str]] | None = None,
) -> dg.Output[ArtifactHandle]:
    """Build (or reuse) this asset partition's artifact and describe it for the UI.

    ``config`` must hold everything outside the inputs that changes the result: the recipe,
    and for assets that read external files, a signature of those files. ``build`` writes the
    artifact's files into the directory it is given and may return extra metadata (JSON-able
    values or Dagster ``MetadataValue``s); that metadata is cached with the artifact.

    ``narrowed_inputs`` are recorded in the lineage (and checked by the input-chain gate) but do
    not enter the fingerprint: for an asset that reads only its own part of a shared artifact,
    the caller puts the digest of that part into ``config`` instead, so a change elsewhere in the
    shared artifact leaves this partition a cache hit.

    On a cache miss, every input (``inputs`` and ``narrowed_inputs``) is verified before ``build``
    runs: the files the build will read are re-hashed against the manifest of the hash the
    parent's materialization recorded, and a mismatch fails the step (:func:`verify_inputs`)
    before anything is built or recorded. ``input_files`` names, per input, the files the build
    reads when it reads only some (a narrowed input's part): only those are hashed; ``()`` for an
    input the build does not read. A cache hit reads no input and verifies none.

    On a cache miss, before that, the step passes the cost gate (:mod:`llm_assets.cost_gate`): a
    training, evaluation or quantization step whose estimate exceeds what is left of
    ``budget.usd_cap`` fails, naming the figures; every step records ``cost_usd`` (and
    ``estimated_cost_usd`` where it has an estimate), stored with the artifact, so a cache hit
    reports what the artifact cost and spends nothing.

    Each call is traced (:mod:`llm_assets.tracing`, when an OTLP endpoint is set): a span for the
    step in its Dagster run's trace, a child for the materialization (asset, partition,
    fingerprint, cache hit, hash, wall seconds, cost, tokens, final loss) and children for its
    phases (verify, build, save; `verify cached` on a cache hit), and under build the phases the
    work marks with ``tracing.phase`` or its worker reports (``tracing.REPORTED_PHASES``). A cache
    miss of a tracked stage is an MLflow run (:mod:`llm_assets.tracking`; docs/tracking.md) whose
    id is stored with the artifact, so a cache hit logs nothing and names the run that built it.
    Neither ever fails the step.
    """
    label = context.asset_key.to_user_string() + (f"[{context.partition_key}]" if context.has_partition_key else "")
    step = context.get_step_execution_context().step.key
    asset_attributes = {"asset": context.asset_key.to_user_string(),
                        "partition": context.partition_key if context.has_partition_key else ""}
    with step_trace(context.run.run_id, step) as traced, traced.span(f"materialize {label}", asset_attributes) as span:
        output = _materialize(context, store, traced, kind=kind, build=build, config=config, inputs=inputs,
                              narrowed_inputs=narrowed_inputs, input_files=input_files)
        span.set_attributes(_span_attributes(output.metadata))
    return output


# What a materialization's span carries, from its metadata (besides asset and partition).
SPAN_ATTRIBUTES = (META_FINGERPRINT, "cache_hit", "sha256", "wall_seconds", "cost_usd", "tokens_seen",
                   "final_train_loss", "final_val_loss", "mlflow_run_id")


def _span_attributes(metadata: Mapping[str, Any]) -> dict[str, str | bool | int | float]:
    values = {key: _plain(metadata[key]) for key in SPAN_ATTRIBUTES if key in metadata}
    return {key: value for key, value in values.items() if isinstance(value, (str, bool, int, float))}


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, dg.MetadataValue) else value


def _materialize(
    context: dg.AssetExecutionContext,
    store: ArtifactStore,
    traced: StepTrace,
    *,
    kind: str,
    build: BuildFn,
    config: Any,
    inputs: Inputs | None,
    narrowed_inputs: Inputs | None,
    input_files: Mapping[str, Sequence[str]] | None,
) -> dg.Output[ArtifactHandle]:
    started = time.perf_counter()
    asset = context.asset_key.to_user_string()
    partition = context.partition_key if context.has_partition_key else None
    code_version = context.assets_def.code_versions_by_key.get(context.asset_key)
    fp = fingerprint_of(context, config, inputs)
    handles = sorted(
        [*flatten_inputs(inputs or {}), *flatten_inputs(narrowed_inputs or {})],
        key=lambda h: (h.asset, h.partition or ""),
    )

    cached = store.index_lookup(asset, partition, fp)
    cache_hit = False
    if cached is not None:
        with traced.span("verify cached"):  # the stored artifact re-hashed: a cache hit's heavy phase
            report = verify_once(store, context.run.run_id, cached["artifact"])
        if report.ok:
            cache_hit = True
            ref = store.ref(cached["artifact"])
            extra = dg.deserialize_value(cached["metadata"]) if cached.get("metadata") else {}
            context.log.info(f"{asset}: cache hit for fingerprint {fp[:12]} -> {ref.sha256[:12]}")
        else:
            context.log.warning(
                f"{asset}: cached artifact {cached['artifact'][:12]} failed verification "
                f"({'; '.join(report.problems)}); rebuilding"
            )
    verify_seconds, verified_bytes, tracking_note = 0.0, 0, None
    if not cache_hit:
        # The cost gate, before anything is read or built: a step over what is left of the budget
        # is refused, naming the figures. What the step then costs is stored with the artifact.
        manifest, gpus = step_manifest(context), step_gpus(context)
        estimate = check_budget(context, manifest, "gpu" if gpus else "cpu")
        verify_started, cpu_started = time.perf_counter(), cpu_seconds()
        with traced.span("verify"):
            verified_bytes = verify_inputs(store, asset if partition is None else f"{asset}[{partition}]", [
                *_input_reads(inputs or {}, input_files or {}),
                *_input_reads(narrowed_inputs or {}, input_files or {}),
            ])
        verify_seconds = time.perf_counter() - verify_started
        tracked = _start_tracked_run(context, fp, code_version, config)
        with store.staging_dir() as workdir:
            try:
                with traced.span("build"):
                    extra = dict(build(workdir) or {})
                    # A worker's phases (load, train), timed in its own process: spans under this one.
                    traced.replay(_plain(extra.pop(REPORTED_PHASES, None)) or [])
            except BaseException:
                if tracked is not None:
                    tracked.fail()
                raise
            with traced.span("save"):
                ref = store.put_dir(workdir, move=True, progress=_progress_logger(context, asset))
        # What the build took and the commit that built it travel with the artifact: a cache hit
        # reports those, next to its own wall_seconds.
        extra.update({META_BUILD_SECONDS: round(time.perf_counter() - started, 3), META_GIT_COMMIT: code_revision(),
                      **cost_metadata(manifest.budget, estimate, time.perf_counter() - verify_started, gpus,
                                      cpu_seconds() - cpu_started)})
        if tracked is not None:
            tracking_note = _finish_tracked_run(context, tracked, extra, ref.uri, ref.sha256)
            if tracked.failure is None:  # stored with the artifact: a cache hit names the run that built it
                extra[META_MLFLOW_RUN_ID] = tracked.run_id
        store.index_record(asset, partition, fp, ref.sha256, dg.serialize_value(extra))

    handle = ArtifactHandle(
        asset=asset, partition=partition, kind=kind, sha256=ref.sha256, uri=ref.uri, bytes=ref.bytes
    )
    metadata = {
        **handle_metadata(handle),
        "files": ref.files,
        META_FINGERPRINT: fp,
        META_INPUTS: dg.MetadataValue.json([h.as_input_record() for h in handles]),
        "code_version": code_version or "",
        "cache_hit": cache_hit,
        "wall_seconds": round(time.perf_counter() - started, 3),
        # What verifying the inputs took in this step, within wall_seconds (nothing on a cache hit).
        META_INPUT_BYTES_VERIFIED: verified_bytes,
        META_INPUT_VERIFY_SECONDS: round(verify_seconds, 4),
        **extra,
        **({META_TRACKING: tracking_note} if tracking_note else {}),
    }
    return dg.Output(handle, data_version=dg.DataVersion(ref.sha256), metadata=metadata)


META_MLFLOW_RUN_ID = "mlflow_run_id"  # the MLflow run that built the artifact (a cache hit shows the builder's)
META_TRACKING = "tracking"  # `logged: <tracking URI>` or `failed: <what and why>`, on a tracked cache miss


def _start_tracked_run(context: dg.AssetExecutionContext, fp: str, code_version: str | None,
                       config: Any) -> TrackedRun | None:
    """The MLflow run of this attempt at building the artifact; None where the asset's stage is
    not tracked (or the asset does not take the tracking resource). A retry, or a re-execution
    of a failed run, is a new attempt: a new run."""
    tracking = getattr(context.resources, "tracking", None)
    stage = context.assets_def.group_names_by_key.get(context.asset_key)
    if not isinstance(tracking, TrackingResource) or not tracking.tracks(stage):
        return None
    asset = context.asset_key.to_user_string()
    partition = context.partition_key if context.has_partition_key else None
    attempt = context.retry_number + 1
    tags = {
        TAG_DAGSTER_RUN: context.run.run_id, TAG_ASSET: asset, TAG_PARTITION: partition or "",
        TAG_ATTEMPT: str(attempt), TAG_FINGERPRINT: fp, TAG_CODE_VERSION: code_version or "",
        TAG_GIT_COMMIT: code_revision(),
    }
    name = (asset if partition is None else f"{asset}[{partition}]") + f" #{attempt}"
    return tracking.start_run(name, tags, flatten_params(config))


def _finish_tracked_run(context: dg.AssetExecutionContext, tracked: TrackedRun, extra: Mapping[str, Any],
                        uri: str, sha256: str) -> str:
    """Log what the build returned to the run and end it; what to show in the step's metadata."""
    tracked.finish({key: _plain(value) for key, value in extra.items()},
                   {TAG_ARTIFACT_URI: uri, TAG_ARTIFACT_SHA256: sha256})
    if tracked.failure is None:
        return f"logged: run {tracked.run_id} at {tracked.tracking_uri}"
    context.log.warning(f"{context.asset_key.to_user_string()}: experiment tracking failed, the artifact is stored "
                        f"all the same: {tracked.failure}. Check that the MLflow server is up (MLFLOW_TRACKING_URI).")
    return f"failed: {tracked.failure}"


# An artifact smaller than this is stored in moments: its write is not logged (the materialization
# records its size); each log line is an event in the run, a database commit.
_LOGGED_WRITE_BYTES = 64 * 2**20


def _progress_logger(context: dg.AssetExecutionContext, asset: str) -> Callable[[str, int, int], None]:
    """Log the store write of a large artifact at most every 10%, so that a long upload shows
    progress without flooding the run's log."""
    state = {"next": 0.1}

    def report(path: str, done: int, total: int) -> None:
        if total < _LOGGED_WRITE_BYTES:
            return
        fraction = done / total
        if fraction >= state["next"] or done == total:
            context.log.info(f"{asset}: stored {done / 1e6:.1f}/{total / 1e6:.1f} MB ({path})")
            state["next"] = fraction + 0.1

    return report
