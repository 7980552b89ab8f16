"""`llm-assets`: plan a pipeline, materialize its asset graph, gate, release, roll back, lock and replay it."""

from __future__ import annotations

import argparse
import difflib
import gc
import os
import sys
from pathlib import Path

from llm_assets.costs import NotEstimable, plan_estimates, size_figures
from llm_assets.data.documents import SourceError
from llm_assets.manifest import BaseModelSize, ManifestError, ModelSize, PipelineManifest, load_manifest
from llm_assets.settings import PROJECT_ROOT, Settings, prepare_dagster_home

EXIT_OK, EXIT_FAILED, EXIT_OVER_BUDGET = 0, 1, 2


def ensure_dagster_home() -> Path:
    """Use $DAGSTER_HOME, defaulting to .dagster_home/ in the checkout with our dagster.yaml."""
    return prepare_dagster_home(Path(os.environ.setdefault("DAGSTER_HOME", str(PROJECT_ROOT / ".dagster_home"))))


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _partitioning(partitions_def: object) -> str:
    """How the plan names an asset's partitions: dynamic by name, static by count, multi by dimension."""
    import dagster as dg

    if partitions_def is None:
        return "-"
    if isinstance(partitions_def, dg.MultiPartitionsDefinition):
        return " × ".join(d.name for d in partitions_def.partitions_defs)
    return getattr(partitions_def, "name", None) or f"{len(partitions_def.get_partition_keys())} static"

def cmd_plan(args: argparse.Namespace) -> int:
    try:
        manifest = load_manifest(args.manifest)
    except ManifestError as exc:
        print(f"manifest error:\n{exc}", file=sys.stderr)
        return EXIT_FAILED
    os.environ["LLM_ASSETS_MANIFEST"] = str(Path(args.manifest).resolve())
    from llm_assets.definitions import build_definitions

    defs = build_definitions()
    graph = defs.resolve_asset_graph()
    print(f"pipeline {manifest.name!r} from {args.manifest}: valid\n")
    print(f"asset graph ({len(graph.materializable_asset_keys)} assets, {len(graph.asset_check_keys)} checks):")
    for key in graph.toposorted_asset_keys:
        node = graph.get(key)
        parents = ", ".join(sorted(p.to_user_string() for p in node.parent_keys)) or "(source)"
        partitions = _partitioning(node.partitions_def)
        checks = ", ".join(sorted(c.name for c in node.check_keys))
        print(f"  {key.to_user_string():<22} <- {parents:<28} partitions: {partitions:<20} checks: {checks}")

    print("\nmodel sizes:")
    for name, size in sorted(manifest.model_sizes.items()):
        print(f"  {name:<22} {_size_path(size)}")

    budget = manifest.budget
    on_gpu, on_cpu = plan_estimates(manifest, "gpu"), plan_estimates(manifest, "cpu")
    print("\nestimated compute per step (training: FLOPs = 6·N·D; evaluation and quantization: 2·N·D forward;\n"
          f"  GPU-hours at {budget.assumed_mfu:.0%} MFU of {_human(budget.peak_flops_per_gpu)}FLOP/s, "
          f"${budget.usd_per_gpu_hour:g}/GPU-hour;\n"
          f"  CPU-hours at {_human(budget.cpu_flops_per_core)}FLOP/s per core, ${budget.usd_per_cpu_hour:g}/CPU-hour):")
    print(f"  {'stage':<10} {'partition':<20} {'N params':>10} {'D tokens':>10} {'FLOPs':>10} "
          f"{'GPU-h':>10} {'GPU USD':>10} {'CPU-h':>10} {'CPU USD':>10}")
    for (stage, partition, gpu), (_, _, cpu) in zip(on_gpu, on_cpu, strict=True):
        print(f"  {stage:<10} {partition:<20} {_human(gpu.params):>10} {_human(gpu.tokens):>10} "
              f"{_human(gpu.flops):>10} {gpu.device_hours:>10.3g} {gpu.usd:>10.3g} {cpu.device_hours:>10.3g} "
              f"{cpu.usd:>10.3g}")
    print("  data, tokenizer, release and serving steps have no estimate: each records the CPU time it used "
          "(cost_usd)")
    totals = {"gpu": sum(e.usd for *_, e in on_gpu), "cpu": sum(e.usd for *_, e in on_cpu)}
    # The cap holds the steps where they run: on GPUs when the manifest's training pods ask for them.
    device = "gpu" if manifest.compute.training.gpus else "cpu"
    print(f"\ntotal estimate ${totals['gpu']:.3g} on GPUs, ${totals['cpu']:.3g} on CPUs; the training steps run on "
          f"{device.upper()}s (compute.training.gpus: {manifest.compute.training.gpus}): "
          f"${totals[device]:.3g} against a cap of ${budget.usd_cap:.2f}")
    if totals[device] > budget.usd_cap:
        print(
            f"refused: the estimate exceeds budget.usd_cap by ${totals[device] - budget.usd_cap:.2f}; "
            "shrink the sweep or raise the cap in the manifest", file=sys.stderr,
        )
        return EXIT_OVER_BUDGET
    return EXIT_OK


def _size_path(size: ModelSize | BaseModelSize) -> str:
    """How a model size gets its starting model, for `plan`."""
    if isinstance(size, ModelSize):
        return (f"pretrained here (Llama architecture, N {_human(size.matmul_parameters())}) with the project's "
                "tokenizer")
    try:
        figures = f"N {_human(size_figures(size).params)} from its config.json"
    except NotEstimable:
        figures = "not estimated until imported: its config.json is not local"
    if size.continued_pretraining:
        return (f"base model {size.base_model} imported by base_model ({figures}) with its own tokenizer -> "
                "continued pretraining (pretrain_checkpoint, on the corpus in that tokenizer) -> sft")
    return f"base model {size.base_model} imported by base_model ({figures}) with its own tokenizer; not pretrained"


def _open_project(args: argparse.Namespace) -> PipelineManifest | None:
    """The instance's home, and the manifest (None after printing why it is invalid)."""
    ensure_dagster_home()
    os.environ["LLM_ASSETS_MANIFEST"] = str(Path(args.manifest).resolve())
    try:
        return load_manifest(args.manifest)
    except ManifestError as exc:
        print(f"manifest error:\n{exc}", file=sys.stderr)
        return None


def _materialize(selection: str | None, partitions: list[str] | None = None) -> int:
    import dagster as dg

    from llm_assets.definitions import build_definitions
    from llm_assets.killed_drivers import recover_killed_drivers
    from llm_assets.runner import check_summary, materialize_graph

    defs = build_definitions()
    settings = Settings.from_env()
    if settings.executor == "k8s":  # the cluster runs the steps: submit the runs, execute nothing here
        return _submit(defs, settings, selection, partitions)
    alert_sinks = defs.resources["alert_sinks"]  # the driver alerts its own runs: no daemon needed
    with dg.DagsterInstance.get() as instance:
        # Runs a killed `llm-assets` left in progress are marked failed; its staging debris goes.
        recover_killed_drivers(defs, instance, alert_sinks=alert_sinks)
        result = materialize_graph(defs, instance, selection=selection, partitions=partitions,
                                   alert_sinks=alert_sinks)
    print(f"\n{'asset':<22} {'partition':<20} {'sha256':<14} {'cache':<6} {'seconds':>8}")
    for o in result.outcomes:
        print(f"{o.asset:<22} {o.partition or '-':<20} {o.sha256[:12]:<14} "
              f"{'hit' if o.cache_hit else 'miss':<6} {o.seconds:>8.2f}")
    print(f"\n{len(result.outcomes)} materialization(s), {result.cache_hits} cache hit(s), "
          f"{result.seconds:.1f}s; instance at {os.environ['DAGSTER_HOME']}")
    if result.check_problems:
        print("\n" + "\n".join(check_summary(result.check_problems)))
        print(f"(alerts sent to {alert_sinks.jsonl_path}{' and the webhook' if alert_sinks.webhook_url else ''})")
    if not result.success:
        for line in result.source_problems:  # on_source_error: skip
            print(f"source not ingested: {line}", file=sys.stderr)
        if result.failed_runs:
            print(f"FAILED runs: {', '.join(result.failed_runs)} (open the UI: make ui)", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _submit(defs, settings: Settings, selection: str | None, partitions: list[str] | None) -> int:
    import dagster as dg

    from llm_assets.runner import RUN_TAG
    from llm_assets.submit import SUBMITTED, code_location_workspace, submit_graph

    with dg.DagsterInstance.get() as instance, code_location_workspace(instance, settings.code_location) as workspace:
        result = submit_graph(defs, instance, workspace, settings.code_location, selection, partitions)
    print(f"\n{'run id':<38} {'status':<10} {'partition':<20} assets")
    for run in result.runs:
        print(f"{run.run_id:<38} {run.status:<10} {run.partition or '-':<20} {', '.join(run.assets)}")
    print(f"\n{len(result.runs)} run(s) submitted to the run launcher of the instance at {os.environ['DAGSTER_HOME']}; "
          f"watch them in the UI (Runs, tag {RUN_TAG}={SUBMITTED}) or with `dagster run list`")
    for line in result.source_problems:
        print(f"source not ingested: {line}", file=sys.stderr)
    if result.failed_runs:
        print(f"FAILED runs: {', '.join(result.failed_runs)}", file=sys.stderr)
    return EXIT_OK if result.success else EXIT_FAILED


def cmd_materialize(args: argparse.Namespace) -> int:
    if _open_project(args) is None:
        return EXIT_FAILED
    return _materialize(args.select)


def cmd_rollback(args: argparse.Namespace) -> int:
    """Rematerialize a stage and everything downstream (upstream artifacts are reused as they
    are), or move a model size's current release back to an earlier promoted one."""
    manifest = _open_project(args)
    if manifest is None:
        return EXIT_FAILED
    import dagster as dg

    from llm_assets.definitions import build_definitions

    defs = build_definitions()
    if args.release:
        return _rollback_release(defs, args.release, args.partition)
    graph = defs.resolve_asset_graph()
    names = sorted(k.to_user_string() for k in graph.materializable_asset_keys)
    if args.stage not in names:
        close = difflib.get_close_matches(args.stage, names, n=1)
        print(f"no asset {args.stage!r} in the graph{f'; did you mean {close[0]!r}?' if close else ''} "
              f"(assets: {', '.join(names)})", file=sys.stderr)
        return EXIT_FAILED
    if args.partition and args.partition not in manifest.model_sizes:
        print(f"no model size {args.partition!r}; "
              f"the manifest's model_sizes: {', '.join(sorted(manifest.model_sizes))}",
              file=sys.stderr)
        return EXIT_FAILED
    selection = f'key:"{args.stage}"+'
    rerun = sorted(k.to_user_string() for k in dg.AssetSelection.from_string(selection).resolve(graph))
    print(f"rolling back from {args.stage}{f'[{args.partition}]' if args.partition else ''}: rematerializing "
          f"{', '.join(rerun)}; every other asset is reused as it is")
    return _materialize(selection, [args.partition] if args.partition else None)


def _rollback_release(defs, hash_prefix: str, partition: str | None) -> int:
    import dagster as dg

    from llm_assets.release_pointer import ReleaseError, current_release, find_promoted, move_release

    store = defs.resources["artifact_store"].get_store()
    try:
        target = find_promoted(store, hash_prefix, partition)
    except ReleaseError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_FAILED
    if current_release(store, target.partition) == target.sha256:
        print(f"release[{target.partition}] is already {target.sha256[:12]}")
        return EXIT_OK
    moved = move_release(store, target.partition, target.sha256, "rollback", by=os.environ.get("USER", "cli"))
    with dg.DagsterInstance.get() as instance:  # shown on the release asset in the UI
        instance.report_runless_asset_event(dg.AssetObservation(
            asset_key="release", partition=moved.partition, description="current release moved back",
            metadata={"current_release": moved.sha256, "replaced": moved.previous or "", "by": moved.by}))
    print(f"release[{moved.partition}]: current release moved from {(moved.previous or 'none')[:12]} back to "
          f"{moved.sha256[:12]} (promoted {target.moved_at})")
    if dg.AssetKey("server_spec") in defs.resolve_asset_graph().materializable_asset_keys:
        print("re-rendering the server spec of that release and smoke-testing it")
        return _materialize('key:"server_spec"', [moved.partition])
    return EXIT_OK


def cmd_releases(args: argparse.Namespace) -> int:
    """Every move of each model size's current release, oldest first."""
    if _open_project(args) is None:
        return EXIT_FAILED
    from llm_assets.definitions import build_definitions
    from llm_assets.release_pointer import candidate_release, current_release, release_history

    store = build_definitions().resources["artifact_store"].get_store()
    moves = release_history(store, args.partition)
    if not moves:
        print("no release promoted yet: materialize the release asset")
        return EXIT_OK
    print(f"{'model size':<14} {'release':<14} {'action':<9} {'moved at':<33} by")
    for m in moves:
        mark = " (current)" if current_release(store, m.partition) == m.sha256 and m.action in ("promote", "rollback") \
            else " (candidate)" if m.action == "candidate" and candidate_release(store, m.partition) == m.sha256 else ""
        print(f"{m.partition:<14} {m.sha256[:12]:<14} {m.action:<9} {m.moved_at:<33} {m.by}{mark}")
    return EXIT_OK


def cmd_lock(args: argparse.Namespace) -> int:
    """Export the run lock of the instance's current artifacts."""
    manifest = _open_project(args)
    if manifest is None:
        return EXIT_FAILED
    import dagster as dg

    from llm_assets.definitions import build_definitions
    from llm_assets.lock import build_lock, write_lock

    defs = build_definitions()
    with dg.DagsterInstance.get() as instance:
        lock = build_lock(defs, instance, manifest, defs.resources["artifact_store"].get_store())
    write_lock(lock, Path(args.output))
    checks = [c for e in lock["assets"] for c in e["checks"]]
    print(f"run lock of {len(lock['assets'])} asset partition(s), {len(checks)} check verdict(s) "
          f"({sum(c['status'] != 'passed' for c in checks)} not passed), "
          f"{sum(len(e['overrides']) for e in lock['assets'])} override(s) written to {args.output}")
    return EXIT_OK


def cmd_replay(args: argparse.Namespace) -> int:
    """Rebuild a lock's assets in a fresh store and instance; compare hashes and gate figures."""
    import tempfile

    from llm_assets.lock import LockError, read_lock
    from llm_assets.replay import replay_lock

    try:
        lock = read_lock(Path(args.lock))
        workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="llm-assets-replay-"))
        rows = replay_lock(lock, workdir, rtol=args.rtol, selection=args.select)
    except (LockError, ManifestError, FileExistsError, ValueError) as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_FAILED
    print(f"\n{'asset':<22} {'partition':<20} {'status':<11} detail")
    for r in rows:
        print(f"{r.asset:<22} {r.partition or '-':<20} {r.status:<11} {r.detail}")
    counts = {status: sum(r.status == status for r in rows) for status in sorted({r.status for r in rows})}
    print(f"\nreplayed into {workdir}: " + ", ".join(f"{n} {status}" for status, n in counts.items()))
    return EXIT_OK if all(r.ok for r in rows) else EXIT_FAILED


def cmd_verify(args: argparse.Namespace) -> int:
    if _open_project(args) is None:
        return EXIT_FAILED
    import dagster as dg

    from llm_assets.definitions import build_definitions
    from llm_assets.runner import check_summary, verify_checks

    defs = build_definitions()
    with dg.DagsterInstance.get() as instance:
        problems = verify_checks(defs, instance, alert_sinks=defs.resources["alert_sinks"])
    if problems:
        print("\n".join(check_summary(problems, full=True)))  # every corrupt file, not only the first
        print(f"{len(problems)} check(s) failed; rematerialize the assets named above", file=sys.stderr)
        return EXIT_FAILED
    print("every check passes on every current artifact")
    return EXIT_OK


def cmd_automate(args: argparse.Namespace) -> int:
    """One pass of the daemon's work on the embedded instance: the traffic sensor, then the automation
    conditions until nothing more is requested (llm_assets/automate.py); each run's alerts sent."""
    if _open_project(args) is None:
        return EXIT_FAILED
    import dagster as dg

    from llm_assets.automate import automate_once
    from llm_assets.definitions import build_definitions

    defs = build_definitions()
    with dg.DagsterInstance.get() as instance:
        runs = automate_once(defs, instance, alert_sinks=defs.resources["alert_sinks"])
    for run in runs:
        shown = {"ok": "ok    ", "failed": "FAILED", "skipped": "skip  "}[run.status]
        print(f"{shown}  {run.asset}" + (f"[{run.partition}]" if run.partition else "")
              + f"  run {run.run_id}" + (f"  checks failed: {', '.join(run.failed_checks)}" if run.failed_checks
                                         else ""))
    print(f"{len(runs)} run(s)" if runs else "nothing to do: no new traffic, no condition is true")
    return EXIT_OK if all(run.status == "ok" for run in runs) else EXIT_FAILED


def cmd_override(args: argparse.Namespace) -> int:
    """Record a reviewer's override of one gate for the current artifact of its asset (partition)."""
    manifest = _open_project(args)
    if manifest is None:
        return EXIT_FAILED
    if args.gate not in manifest.gates:
        close = difflib.get_close_matches(args.gate, sorted(manifest.gates), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(f"no gate {args.gate!r} in the manifest's gates (it has: {', '.join(sorted(manifest.gates))}){hint}",
              file=sys.stderr)
        return EXIT_FAILED
    import dagster as dg

    from llm_assets.checks.gates import GATE_METADATA_KEY, record_override
    from llm_assets.definitions import build_definitions
    from llm_assets.runner import run_checks
    from resources.handles import latest_materializations

    defs = build_definitions()
    graph = defs.resolve_asset_graph()
    checks = [graph.get(key) for key in graph.asset_check_keys
              if args.gate in str(graph.get(key).metadata.get(GATE_METADATA_KEY, "")).split(",")]
    if not checks:
        print(f"gate {args.gate!r} guards no asset of this graph: its stage is not configured", file=sys.stderr)
        return EXIT_FAILED
    asset_key = checks[0].key.asset_key
    with dg.DagsterInstance.get() as instance:
        current = latest_materializations(instance, asset_key, [args.partition] if args.partition else None)
        if args.partition is None and len(current) > 1:
            print(f"{asset_key.to_user_string()} has several partitions ({', '.join(sorted(map(str, current)))}): "
                  "name one with --partition", file=sys.stderr)
            return EXIT_FAILED
        if not current:
            where = f"[{args.partition}]" if args.partition else ""
            existing = sorted(map(str, latest_materializations(instance, asset_key)))
            known = f" (its materialized partitions: {', '.join(existing)})" if existing else ""
            print(f"{asset_key.to_user_string()}{where} has no materialization to override the gate for{known}; "
                  "materialize it first", file=sys.stderr)
            return EXIT_FAILED
        partition, mat = next(iter(current.items()))
        store = defs.resources["artifact_store"].get_store()
        override = record_override(store, args.gate, asset_key.to_user_string(), partition,
                                   mat.metadata["sha256"].value, args.reviewer, args.reason)
        # Evaluate the asset's checks again, so the gate shows as passed (with the override) at once.
        run_checks(defs, instance, [asset_key], partition)
    print(f"override recorded: gate {args.gate} on {override.asset}{f'[{partition}]' if partition else ''} "
          f"{override.sha256[:12]} by {override.reviewer}: {override.reason}")
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the model of a size's current release (or any model artifact) over an OpenAI-compatible API."""
    manifest = _open_project(args)
    if manifest is None:
        return EXIT_FAILED
    from llm_assets.definitions import build_definitions
    from llm_assets.release_pointer import current_release, read_release
    from llm_assets.serving import ServeConfig, serve
    from llm_assets.store import ArtifactStoreError

    store = build_definitions().resources["artifact_store"].get_store()
    schemes = manifest.stages.quantize.schemes if manifest.stages.quantize is not None else []
    if args.scheme is not None and args.scheme not in schemes:
        print(f"--scheme {args.scheme}: the manifest's stages.quantize.schemes are "
              f"{', '.join(schemes) or 'none (no quantize stage)'}", file=sys.stderr)
        return EXIT_FAILED
    if args.candidate is not None and (args.model or args.scheme is not None):
        print("--candidate serves a candidate release next to the size's current release, both at full precision: "
              "use it with --size only, not with --model or --scheme", file=sys.stderr)
        return EXIT_FAILED
    if args.model:
        if args.scheme is not None:
            print("--scheme picks the quantized model of a release's model: use it with --size, not --model (pass a "
                  "quantized model's own hash to --model instead)", file=sys.stderr)
            return EXIT_FAILED
        sha, what, release = args.model, "given by --model", None
    else:
        sizes = sorted(manifest.model_sizes)
        size = args.size or (sizes[0] if len(sizes) == 1 else None)
        if size not in manifest.model_sizes:
            print(f"name a model size with --size (the manifest's model_sizes: {', '.join(sizes)})", file=sys.stderr)
            return EXIT_FAILED
        release = current_release(store, size)
        if release is None:
            print(f"no release of {size!r} promoted yet: materialize the graph (llm-assets materialize), "
                  "or serve a model artifact with --model HASH", file=sys.stderr)
            return EXIT_FAILED
        sha, what = read_release(store, release)["model"]["sha256"], f"current release {release[:12]} of {size}"
        if args.scheme is not None:
            import dagster as dg

            from llm_assets.serving.quantized import QuantizedModelNotFoundError, quantized_model_sha256

            try:
                with dg.DagsterInstance.get() as instance:
                    sha, what = quantized_model_sha256(instance, size, args.scheme, sha), f"{what}, {args.scheme}"
            except QuantizedModelNotFoundError as exc:
                print(f"cannot serve {size} as {args.scheme}: {exc}", file=sys.stderr)
                return EXIT_FAILED
    try:
        model_dir = store.local_dir(sha, verify=True)  # the hash gate: serve only the recorded bytes
    except ArtifactStoreError as exc:  # InvalidKeyError (a malformed hash) is one too
        print(f"cannot serve model {sha[:12]}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    candidate = None
    if args.candidate is not None:
        try:
            candidate = _candidate_to_serve(store, manifest, size, release, args.candidate)
        except (ValueError, ArtifactStoreError) as exc:
            print(f"cannot serve the candidate {args.candidate!r}: {exc}", file=sys.stderr)
            return EXIT_FAILED
        print(f"canary: release {candidate[2][:12]} (model {candidate[1][:12]}) answers {candidate[3]:.0%} of the "
              "requests (by the hash of each request's x-request-id header)")
    config = ServeConfig(api_key=os.environ.get("LLM_ASSETS_API_KEY") or None, max_tokens=args.max_tokens,
                         max_batch_size=args.max_batch_size, log_dir=Path(args.log_dir), log_prompts=args.log_prompts,
                         release=release, scheme=args.scheme,
                         **({"candidate_release": candidate[2], "canary_fraction": candidate[3]} if candidate else {}))
    print(f"serving model {sha[:12]} ({what}) on http://{args.host}:{args.port}/v1; request and feedback logs in "
          f"{args.log_dir}")
    serve(model_dir, sha, host=args.host, port=args.port, config=config,
          candidate=candidate[:2] if candidate else None)
    return EXIT_OK


def _candidate_to_serve(store, manifest: PipelineManifest, size: str, current: str, given: str
                        ) -> tuple[Path, str, str, float]:
    """The candidate's model directory (verified), model hash, release hash and traffic fraction:
    `given` is 6+ characters of a release of `size` in its history, or `proposed` for its candidate."""
    from llm_assets.release_pointer import candidate_release, read_release, release_history

    proposed = candidate_release(store, size)
    known = sorted({m.sha256 for m in release_history(store, size)} | ({proposed} if proposed else set()))
    shown = f"the proposed candidate is {proposed[:12] if proposed else 'none'}; releases of {size}: " + \
        (", ".join(sha[:12] for sha in known) or "none")
    if given == "proposed":
        if proposed is None:
            raise ValueError(f"no candidate is proposed for {size}: the release step proposes one when "
                             "stages.serving.canary is set and it stores a new release")
        found = [proposed]
    elif len(given) < 6:
        raise ValueError(f"give at least 6 characters of the release hash, or `proposed`; {shown}")
    else:
        found = [sha for sha in known if sha.startswith(given.lower())]
    if len(found) != 1:
        raise ValueError(f"{'no' if not found else 'more than one'} release of {size} starts with {given!r}; {shown}")
    if found[0] == current:
        raise ValueError(f"{found[0][:12]} is the current release itself; a canary compares another release with it")
    model = read_release(store, found[0])["model"]["sha256"]
    canary = manifest.stages.serving.canary if manifest.stages.serving is not None else None
    return store.local_dir(model, verify=True), model, found[0], canary.fraction if canary else 0.1


def cmd_partitions(args: argparse.Namespace) -> int:
    """`partitions prune`: list the corpus_shards partitions that no source of the manifest produces
    and remove them from the instance (after a prompt, or with --yes). Partitions of a source that
    cannot be listed right now are kept: nothing says they are gone."""
    manifest = _open_project(args)
    if manifest is None:
        return EXIT_FAILED
    import dagster as dg

    from llm_assets.data.partitions import corpus_shards
    from llm_assets.data.sources import classify_partitions, discover_sources

    found = discover_sources(manifest)
    for problem in found.problems:
        print(f"warning: {problem.message}", file=sys.stderr)
    with dg.DagsterInstance.get() as instance:
        existing = instance.get_dynamic_partitions(corpus_shards.name)
        stale, unlisted = classify_partitions(manifest, found, existing)
        if unlisted:
            print(f"kept {len(unlisted)} partition(s) of sources that cannot be listed now: {', '.join(unlisted)}")
        if not stale:
            print(f"nothing to prune: every one of the {len(existing)} {corpus_shards.name} partition(s) "
                  "is produced by a source of the manifest" + (" or kept" if unlisted else ""))
            return EXIT_OK
        width = max(len(p.key) for p in stale)
        print(f"{len(stale)} of {len(existing)} {corpus_shards.name} partition(s) no source produces:")
        for p in stale:
            print(f"  {p.key:<{width}}  {p.reason}")
        if args.dry_run:
            print("dry run: nothing removed (run again with --yes to remove them)")
            return EXIT_OK
        if not args.yes:
            if not sys.stdin.isatty():
                print("nothing removed: no terminal to confirm on; pass --yes to remove them "
                      "(--dry-run only lists them)", file=sys.stderr)
                return EXIT_FAILED
            if input(f"remove these {len(stale)} partition(s) from the instance? [y/N] ").strip().lower() not in (
                    "y", "yes"):
                print("nothing removed")
                return EXIT_OK
        for p in stale:
            instance.delete_dynamic_partition(corpus_shards.name, p.key)
    print(f"removed {len(stale)} partition(s) from {corpus_shards.name}; the runs and artifacts that were built "
          "for them stay in the instance's history and the store")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llm-assets", description=__doc__)
    parser.add_argument(
        "--manifest", default=os.environ.get("LLM_ASSETS_MANIFEST", str(PROJECT_ROOT / "pipeline.yaml")),
        help="pipeline manifest (default: $LLM_ASSETS_MANIFEST or pipeline.yaml)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("plan", help="validate the manifest, print the DAG and the cost estimate")
    mat = sub.add_parser("materialize", help="materialize the asset graph on the local instance")
    mat.add_argument("--select", help="Dagster asset selection, e.g. 'key:raw_corpus+' (default: all)")
    sub.add_parser("verify", help="re-run every check (hash gates included) on the current artifact of every partition")
    automate = sub.add_parser("automate", help="evaluate the automation conditions (and the traffic sensor) on the "
                              "local instance and run what they request, as the daemon would")
    automate.add_argument("--once", action="store_true", required=True,
                          help="one pass, until nothing more is requested (the daemon ticks for ever)")
    override = sub.add_parser("override",
                              help="let a failed gate pass for the current artifact, on a reviewer's record")
    override.add_argument("--gate", required=True, help="the gate's name in the manifest's gates, e.g. policy_kl")
    override.add_argument("--reviewer", required=True, help="who takes responsibility")
    override.add_argument("--reason", required=True, help="why the artifact may pass anyway")
    override.add_argument("--partition", help="the partition: a model size, or 'SIZE|SCHEME' for quantized_model "
                                              "(required when the asset has several)")
    rollback = sub.add_parser("rollback", help="rematerialize a stage and its downstream, or move a release back")
    target = rollback.add_mutually_exclusive_group(required=True)
    target.add_argument("--from", dest="stage", help="the asset to rematerialize from, e.g. sft_model")
    target.add_argument("--release", help="hash (or its first 6+ characters) of an earlier promoted release")
    rollback.add_argument("--partition", help="only this model size")
    releases = sub.add_parser("releases", help="list the promotions and rollbacks of the current release")
    releases.add_argument("--partition", help="only this model size")
    lock = sub.add_parser("lock", help="export the run lock of the instance's current artifacts")
    lock.add_argument("--output", default="run.lock.json", help="where to write it (default: run.lock.json)")
    replay = sub.add_parser("replay", help="rebuild a run lock in a fresh store and compare, asset by asset")
    replay.add_argument("lock", help="a file written by `llm-assets lock`")
    replay.add_argument("--workdir",
                        help="an empty directory for the fresh store and instance (default: a new temp dir)")
    replay.add_argument("--select", help="replay only these assets (a selection closed under its upstream)")
    replay.add_argument("--rtol", type=float, default=0.05,
                        help="relative tolerance on gate figures of training stages (default 0.05)")
    serve = sub.add_parser("serve", help="serve a size's current release over an OpenAI-compatible API")
    which = serve.add_mutually_exclusive_group()
    which.add_argument("--size", help="model size whose current release to serve (default: the manifest's only size)")
    which.add_argument("--model", help="sha256 of a model artifact in the store, instead of a release")
    serve.add_argument("--candidate", metavar="RELEASE",
                       help="also serve this release of the size (6+ characters of its hash, or `proposed`: the "
                            "candidate the release step proposed) for stages.serving.canary.fraction of the requests "
                            "(default 0.1); canary_report compares the two")
    serve.add_argument("--scheme", help="serve the release's model quantized by this scheme of stages.quantize "
                                        "(int8, gptq-4bit): its quantized_model artifact")
    serve.add_argument("--host", default="127.0.0.1",
                       help="interface to bind (default 127.0.0.1); set LLM_ASSETS_API_KEY before binding another")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--max-tokens", type=int, default=256, help="cap on a request's max_tokens (default 256)")
    serve.add_argument("--max-batch-size", type=int, default=8,
                       help="sequences decoded together: slots of the running batch (default 8)")
    serve.add_argument("--log-dir", default=str(PROJECT_ROOT / ".serve" / "logs"),
                       help="durable request and feedback logs, rotated into closed requests-*.jsonl and "
                            "feedback-*.jsonl files (default .serve/logs)")
    serve.add_argument("--log-prompts", action="store_true",
                       help="also log prompt and answer texts (they may hold personal data)")
    partitions = sub.add_parser("partitions", help="manage the corpus_shards partitions of the instance")
    partitions_sub = partitions.add_subparsers(dest="partitions_command", required=True)
    prune = partitions_sub.add_parser(
        "prune", help="remove the corpus_shards partitions no source produces any more (a source removed or renamed)")
    confirm = prune.add_mutually_exclusive_group()
    confirm.add_argument("--yes", action="store_true", help="remove without asking (needed without a terminal)")
    confirm.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    args = parser.parse_args(argv)
    handler = {"plan": cmd_plan, "materialize": cmd_materialize, "verify": cmd_verify, "override": cmd_override,
               "rollback": cmd_rollback, "releases": cmd_releases, "lock": cmd_lock, "replay": cmd_replay,
               "serve": cmd_serve, "partitions": cmd_partitions,
               "automate": cmd_automate}[args.command]
    try:
        return handler(args)
    except SourceError as exc:  # a source that cannot be listed (on_source_error: stop): one line each
        print(f"source error, nothing was run:\n{exc}", file=sys.stderr)
        return EXIT_FAILED


def entry_point() -> None:
    """The `llm-assets` command: `main`, then exit without the interpreter's last full garbage
    collection over Dagster's (and, after training or serving, torch's) objects, a second or more
    that nobody waits for usefully."""
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    entry_point()
