"""The evaluation report: every figure of a model, its change against a previous report, and the
JSON and markdown the Dagster UI shows.

Figures are ``task → metric → value``. lm-eval's tasks keep their names; the refusal rates are
``safety/refusal_rate`` (red-team prompts) and ``safety/benign_refusal_rate`` (everyday
prompts), and the caller's own figures (a KL to the reference model, say) are under ``extra``,
so all of them compare alike. ``baselines`` holds what reference models score on the same data,
figure (``task.metric``) → kind (``unigram``) → value: the bars the eval gates may be measured
from, shown beside the figure, never compared as figures of their own.

Direction. :func:`higher_is_better` decides which way a metric improves, by its name (a
``:filter`` suffix aside): lower is better for a name that is, starts with ``<word>_`` or ends
with ``_<word>`` for a word of :data:`LOWER_IS_BETTER` (``word_perplexity``, ``bits_per_byte``,
``val_loss``, ``kl_to_sft``, ``ter``); higher for everything else (``acc``, ``acc_norm``,
``exact_match``, ``chrf``, ``refusal_rate``, ``f1``, ``pass@1``): most benchmark figures are
scores. NaN is worse than any number; infinity compares as a number (an infinite perplexity is
worse than a finite one).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from llm_assets.evaluation.safety import SafetyExample, SafetyResult

if TYPE_CHECKING:  # lm-eval takes seconds to import; a report read back from JSON does not need it
    import dagster as dg

    from llm_assets.evaluation.harness import HarnessResult

# "benign": refusing an everyday request is a failure to help (safety/benign_refusal_rate).
LOWER_IS_BETTER = ("perplexity", "bits_per_byte", "loss", "kl", "ter", "brier_score", "benign")
SAFETY_TASK, EXTRA_TASK = "safety", "extra"
_NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}
Verdict = Literal["worse", "better", "same"]
# The figures table of the UI: a row per figure of the report.
FIGURE_COLUMNS = [
    ("task", "string"), ("metric", "string"), ("value", "float"), ("stderr", "float"),
    ("higher_is_better", "bool"), ("documents", "int", "documents (prompts for safety) the figure was measured on"),
]


def higher_is_better(metric: str) -> bool:
    name = metric.partition(":")[0].lower()
    return not any(name == w or name.startswith(f"{w}_") or name.endswith(f"_{w}") for w in LOWER_IS_BETTER)


@dataclass(frozen=True)
class EvalReport:
    metrics: dict[str, dict[str, float]]  # lm-eval's: task → metric → value
    stderr: dict[str, dict[str, float]] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)  # documents per task
    safety: SafetyResult | None = None  # refusals of the red-team prompts
    benign: SafetyResult | None = None  # refusals of the everyday prompts
    extra: dict[str, float] = field(default_factory=dict)
    baselines: dict[str, dict[str, float]] = field(default_factory=dict)  # task.metric → kind → value

    def __post_init__(self) -> None:
        clash = sorted({SAFETY_TASK, EXTRA_TASK} & self.metrics.keys())
        if clash:
            raise ValueError(f"task name(s) {clash} are reserved for the report's own sections; rename the task")

    @classmethod
    def from_harness(cls, result: HarnessResult, *, safety: SafetyResult | None = None,
                     benign: SafetyResult | None = None, extra: dict[str, float] | None = None,
                     baselines: dict[str, dict[str, float]] | None = None) -> EvalReport:
        return cls(metrics=result.metrics, stderr=result.stderr, samples=result.samples, safety=safety,
                   benign=benign, extra=dict(extra or {}), baselines=dict(baselines or {}))

    def figures(self) -> dict[str, dict[str, float]]:
        """Every figure, task → metric → value, the safety and extra sections included."""
        out = {task: dict(values) for task, values in self.metrics.items()}
        if self.safety is not None:
            out[SAFETY_TASK] = {"refusal_rate": self.safety.rate}
        if self.benign is not None:
            out.setdefault(SAFETY_TASK, {})["benign_refusal_rate"] = self.benign.rate
        if self.extra:
            out[EXTRA_TASK] = dict(self.extra)
        return out

    def named_figures(self) -> dict[str, float]:
        """Every figure under its gate name ``task.metric`` (as eval_report's metadata has them)."""
        return {f"{task}.{metric}": value for task, values in self.figures().items()
                for metric, value in values.items()}

    def figures_table(self) -> dg.TableMetadataValue:
        """Every figure (:meth:`figures`) as table metadata for the UI, with its stderr, its
        direction and the documents behind it."""
        from llm_assets.tables import table

        documents = {**self.samples, **({SAFETY_TASK: self.safety.prompts} if self.safety is not None else {})}
        rows = [{"task": task, "metric": metric, "value": value, "stderr": self.stderr.get(task, {}).get(metric),
                 "higher_is_better": higher_is_better(metric), "documents": documents.get(task)}
                for task, values in sorted(self.figures().items()) for metric, value in sorted(values.items())]
        return table(rows, FIGURE_COLUMNS)

    def to_json(self) -> str:
        """Sorted keys, two-space indent: the same report gives the same bytes. Non-finite numbers
        are the strings "inf", "-inf", "nan" (JSON has no such numbers)."""
        return json.dumps(_encode(asdict(self)), sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> EvalReport:
        data = json.loads(text)
        return cls(
            metrics=_decode_tables(data["metrics"]),
            stderr=_decode_tables(data.get("stderr", {})),
            samples=data.get("samples", {}),
            safety=_decode_safety(data.get("safety")),
            benign=_decode_safety(data.get("benign")),
            extra=_decode_table(data.get("extra", {})),
            baselines=_decode_tables(data.get("baselines", {})),
        )

    def to_markdown(self, previous: EvalReport | None = None, against: str = "the previous report") -> str:
        """A table per task, the safety answers, the extra figures and, given a previous report
        (described by `against`), the change of every shared figure."""
        parts = ["# Evaluation"]
        for task in sorted(self.metrics):
            errors = self.stderr.get(task, {})
            rows = [f"| {m} | {_number(v)} | {_number(errors[m]) if m in errors else ''} |"
                    for m, v in sorted(self.metrics[task].items())]
            count = f"\n\n{self.samples[task]} documents" if task in self.samples else ""
            parts.append(f"## {task}\n\n| metric | value | stderr |\n|---|---:|---:|\n" + "\n".join(rows) + count)
        for metric, s in (("refusal_rate", self.safety), ("benign_refusal_rate", self.benign)):
            if s is None:
                continue
            rows = [f"| {_cell(e.prompt)} | {_cell(e.completion)} | {'yes' if e.refused else 'no'} |"
                    for e in s.examples]
            parts.append(f"## {SAFETY_TASK}: {metric}\n\n{metric} {_number(s.rate)} ({s.refusals} of {s.prompts} "
                         "prompts)" + ("\n\n| prompt | answer | refused |\n|---|---|---|\n" + "\n".join(rows)
                                       if rows else ""))
        if self.extra:
            rows = [f"| {name} | {_number(value)} |" for name, value in sorted(self.extra.items())]
            parts.append(f"## {EXTRA_TASK}\n\n| figure | value |\n|---|---:|\n" + "\n".join(rows))
        if self.baselines:
            parts.append(self._baselines_markdown())
        if previous is not None:
            parts.append(change_markdown(self, previous, against))
        return "\n\n".join(parts) + "\n"

    def _baselines_markdown(self) -> str:
        figures = self.named_figures()
        rows = [f"| {name} | {kind} | {_number(value)} | "
                f"{_number(figures[name]) if name in figures else ''} |"
                for name, kinds in sorted(self.baselines.items()) for kind, value in sorted(kinds.items())]
        return ("## Baselines\n\nReference models on the same documents: the bars the gates may be measured "
                "from.\n\n| figure | baseline | baseline value | this model |\n|---|---|---:|---:|\n" + "\n".join(rows))


def change_markdown(current: EvalReport, previous: EvalReport, against: str) -> str:
    """The change of every figure the two reports share, as a markdown section."""
    rows = [f"| {r.task} | {r.metric} | {_number(r.previous)} | {_number(r.current)} | {_number(r.change)} | "
            f"{'' if r.relative_change is None else f'{r.relative_change:+.1%}'} | {r.verdict} |"
            for r in regression(current, previous)]
    header = ("| task | metric | previous | current | change | relative | verdict |\n"
              "|---|---|---:|---:|---:|---:|---|\n")
    return (f"## Change against {against}\n\n"
            + (header + "\n".join(rows) if rows else f"No figure in common with {against}."))


@dataclass(frozen=True)
class RegressionRow:
    task: str
    metric: str
    previous: float
    current: float
    change: float  # current − previous
    relative_change: float | None  # change / |previous|; None when previous is 0 or not finite
    higher_is_better: bool
    worse: bool

    @property
    def verdict(self) -> Verdict:
        if self.worse:
            return "worse"
        return "same" if _same(self.previous, self.current) else "better"


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def _worse(previous: float, current: float, higher: bool) -> bool:
    if math.isnan(current) or math.isnan(previous):
        return math.isnan(current) and not math.isnan(previous)
    return current < previous if higher else current > previous


def regression(current: EvalReport, previous: EvalReport) -> list[RegressionRow]:
    """A row for every figure both reports have, sorted by task and metric."""
    now, before = current.figures(), previous.figures()
    rows = []
    for task in sorted(now.keys() & before.keys()):
        for metric in sorted(now[task].keys() & before[task].keys()):
            new, old = now[task][metric], before[task][metric]
            change = new - old
            relative = change / abs(old) if old != 0 and math.isfinite(old) and math.isfinite(change) else None
            higher = higher_is_better(metric)
            rows.append(RegressionRow(task, metric, old, new, change, relative, higher, _worse(old, new, higher)))
    return rows


def _decode_safety(data: dict[str, Any] | None) -> SafetyResult | None:
    return SafetyResult(**{**data, "examples": [SafetyExample(**e) for e in data["examples"]]}) if data else None


def _number(value: float) -> str:
    return f"{value:.4g}"


def _cell(text: str, limit: int = 80) -> str:
    flat = " ".join(text.split())
    flat = flat if len(flat) <= limit else flat[: limit - 1] + "…"
    return flat.replace("\\", "\\\\").replace("|", "\\|")


def _encode(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {key: _encode(v) for key, v in value.items()}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    return value


def _decode_table(table: dict[str, Any]) -> dict[str, float]:
    return {name: _NON_FINITE[v] if isinstance(v, str) else float(v) for name, v in table.items()}


def _decode_tables(tables: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    return {task: _decode_table(table) for task, table in tables.items()}
