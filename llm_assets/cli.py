"""`llm-assets`: plan a pipeline and materialize its asset graph."""

from __future__ import annotations

import argparse
import difflib
import os
import shutil
import sys
from pathlib import Path

from llm_assets.costs import training_estimate
from llm_assets.manifest import ManifestError, PipelineManifest, load_manifest
from llm_assets.settings import PROJECT_ROOT

EXIT_OK, EXIT_FAILED, EXIT_OVER_BUDGET = 0, 1, 2


def ensure_dagster_home() -> Path:
    """Use $DAGSTER_HOME, defaulting to .dagster_home/ in the checkout with our dagster.yaml."""
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(PROJECT_ROOT / ".dagster_home")))
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists() and (PROJECT_ROOT / "dagster.yaml").exists():
        shutil.copyfile(PROJECT_ROOT / "dagster.yaml", config)
    return home


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def estimate_rows(manifest: PipelineManifest) -> list[dict]:
    """Compute estimate per training stage and partition: FLOPs = 6·N·D (D at most, for the trl
    stages: every sequence at max_length)."""
    stages = manifest.stages
    recipes = {"pretrain": stages.pretrain, "sft": stages.sft, "reward": stages.reward, "policy": stages.policy}
    return [
        {"stage": stage, "partition": size, **training_estimate(spec, recipe, manifest.budget).__dict__}
        for stage, recipe in recipes.items() if recipe is not None
        for size, spec in manifest.model_sizes.items()
    ]


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
        partitions = getattr(node.partitions_def, "name", None) or ("static" if node.partitions_def else "-")
        checks = ", ".join(sorted(c.name for c in node.check_keys))
        print(f"  {key.to_user_string():<22} <- {parents:<28} partitions: {partitions:<14} checks: {checks}")

    rows = estimate_rows(manifest)
    budget = manifest.budget
    print("\nestimated compute (FLOPs = 6·N·D; GPU-hours at "
          f"{budget.assumed_mfu:.0%} MFU of {_human(budget.peak_flops_per_gpu)}FLOP/s; "
          f"${budget.usd_per_gpu_hour}/GPU-hour):")
    print(f"  {'stage':<10} {'partition':<12} {'N params':>10} {'D tokens':>10} {'FLOPs':>10} {'GPU-h':>10} {'USD':>10}")
    for r in rows:
        print(f"  {r['stage']:<10} {r['partition']:<12} {_human(r['params']):>10} {_human(r['tokens']):>10} "
              f"{_human(r['flops']):>10} {r['gpu_hours']:>10.4f} {r['usd']:>10.4f}")
    print("  data stages run on CPU and are not charged GPU time")
    total = sum(r["usd"] for r in rows)
    print(f"\ntotal estimate ${total:.4f} against a cap of ${budget.usd_cap:.2f}")
    if total > budget.usd_cap:
        print(
            f"refused: the estimate exceeds budget.usd_cap by ${total - budget.usd_cap:.2f}; "
            "shrink the sweep or raise the cap in the manifest", file=sys.stderr,
        )
        return EXIT_OVER_BUDGET
    return EXIT_OK


def cmd_materialize(args: argparse.Namespace) -> int:
    ensure_dagster_home()
    os.environ["LLM_ASSETS_MANIFEST"] = str(Path(args.manifest).resolve())
    try:
        load_manifest(args.manifest)
    except ManifestError as exc:
        print(f"manifest error:\n{exc}", file=sys.stderr)
        return EXIT_FAILED
    import dagster as dg

    from llm_assets.definitions import build_definitions
    from llm_assets.runner import materialize_graph

    with dg.DagsterInstance.get() as instance:
        result = materialize_graph(build_definitions(), instance, selection=args.select)
    print(f"\n{'asset':<22} {'partition':<14} {'sha256':<14} {'cache':<6} {'seconds':>8}")
    for o in result.outcomes:
        print(f"{o.asset:<22} {o.partition or '-':<14} {o.sha256[:12]:<14} "
              f"{'hit' if o.cache_hit else 'miss':<6} {o.seconds:>8.2f}")
    print(f"\n{len(result.outcomes)} materialization(s), {result.cache_hits} cache hit(s), "
          f"{result.seconds:.1f}s; instance at {os.environ['DAGSTER_HOME']}")
    if not result.success:
        print(f"FAILED runs: {', '.join(result.failed_runs)} (open the UI: make ui)", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    ensure_dagster_home()
    os.environ["LLM_ASSETS_MANIFEST"] = str(Path(args.manifest).resolve())
    import dagster as dg

    from llm_assets.definitions import build_definitions
    from llm_assets.runner import verify_graph

    with dg.DagsterInstance.get() as instance:
        failures = verify_graph(build_definitions(), instance)
    if failures:
        print(f"{len(failures)} check(s) failed; rematerialize the assets named above", file=sys.stderr)
        return EXIT_FAILED
    print("every check passes on every current artifact")
    return EXIT_OK


def cmd_override(args: argparse.Namespace) -> int:
    """Record a reviewer's override of one gate for the current artifact of its asset (partition)."""
    ensure_dagster_home()
    os.environ["LLM_ASSETS_MANIFEST"] = str(Path(args.manifest).resolve())
    try:
        manifest = load_manifest(args.manifest)
    except ManifestError as exc:
        print(f"manifest error:\n{exc}", file=sys.stderr)
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
            print(f"{asset_key.to_user_string()}{where} has no materialization to override the gate for; "
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
    override = sub.add_parser("override", help="let a failed gate pass for the current artifact, on a reviewer's record")
    override.add_argument("--gate", required=True, help="the gate's name in the manifest's gates, e.g. policy_kl")
    override.add_argument("--reviewer", required=True, help="who takes responsibility")
    override.add_argument("--reason", required=True, help="why the artifact may pass anyway")
    override.add_argument("--partition", help="the model size (required when the asset has several)")
    args = parser.parse_args(argv)
    handler = {"plan": cmd_plan, "materialize": cmd_materialize, "verify": cmd_verify,
               "override": cmd_override}[args.command]
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
