"""Numeric gates: a metric against a threshold the manifest fixed before the run."""

from __future__ import annotations

import math

from llm_assets.manifest import GateSpec


def gate_problems(gates: dict[str, GateSpec], name: str, value: float, label: str) -> list[str]:
    """Why `value` (the metric of `label`, e.g. a partition) fails gates.`name`; empty if it passes."""
    gate = gates.get(name)
    if gate is None:
        return [f"no threshold: set gates.{name} (min and/or max) in the manifest"]
    if not math.isfinite(value):
        return [f"{label}: {name} is {value}"]
    problems = []
    if gate.min is not None and value < gate.min:
        problems.append(f"{label}: {name} {value:.4g} < gate min {gate.min:g}")
    if gate.max is not None and value > gate.max:
        problems.append(f"{label}: {name} {value:.4g} > gate max {gate.max:g}")
    return problems


def gate_metadata(gates: dict[str, GateSpec], name: str) -> dict[str, float]:
    """The thresholds, for a check's metadata (NaN where unset)."""
    gate = gates.get(name)
    return {
        f"gate_{name}_min": gate.min if gate and gate.min is not None else float("nan"),
        f"gate_{name}_max": gate.max if gate and gate.max is not None else float("nan"),
    }
