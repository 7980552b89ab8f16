"""The live figures of a canary: the candidate release against the current one, from the server's
request and feedback logs (llm_assets/serving/records.py).

Each request record names the release that answered it. Per release: generation requests (the
completions and chat endpoints; a 4xx is the client's doing and is left out), the error rate
(status 5xx), latency p50/p99 of the answered ones, the refusal rate of the answers the log holds
(`--log-prompts`; the same detector as the evaluation's safety figure) and the feedback score (mean
rating, +1/-1, of the feedback on that release's completions, joined by completion id). The gate
figures compare the two: `canary.error_rate_increase` = candidate - current, and so on.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llm_assets.evaluation.safety import is_refusal
from llm_assets.serving.records import read_log

GENERATION_ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
NAN = float("nan")


@dataclass(frozen=True)
class ReleaseTraffic:
    """What one release's served traffic shows."""

    release: str
    requests: int  # generation requests it answered or failed (4xx left out)
    errors: int  # of those, answered 5xx
    latency_p50_s: float
    latency_p99_s: float
    answers: int  # answer texts in the log (choices of requests logged with --log-prompts)
    refusals: int
    ratings: int
    feedback_score: float  # mean rating, NaN without any

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else NAN

    @property
    def refusal_rate(self) -> float:
        return self.refusals / self.answers if self.answers else NAN

    def row(self) -> dict[str, Any]:
        return {**asdict(self), "error_rate": self.error_rate, "refusal_rate": self.refusal_rate}


@dataclass(frozen=True)
class CanaryTraffic:
    current: ReleaseTraffic
    candidate: ReleaseTraffic
    digest: str  # sha256 of the records read: the report's fingerprint changes with the traffic

    def gate_figures(self) -> dict[str, float]:
        """Every canary gate's figure (NaN where the traffic does not tell yet)."""
        cur, cand = self.current, self.candidate
        ratio = cand.latency_p99_s / cur.latency_p99_s if cur.latency_p99_s > 0 else NAN
        return {
            "canary.candidate_requests": float(cand.requests),
            "canary.error_rate_increase": cand.error_rate - cur.error_rate,
            "canary.latency_p99_ratio": ratio,
            "canary.refusal_rate_increase": cand.refusal_rate - cur.refusal_rate,
            "canary.feedback_score_drop": cur.feedback_score - cand.feedback_score,
        }

    def missing(self) -> dict[str, list[str]]:
        """Why a figure is NaN, per gate: what traffic or logging it waits for."""
        why: dict[str, list[str]] = {}
        for name, traffic in (("current", self.current), ("candidate", self.candidate)):
            if not traffic.requests:
                for gate in ("canary.error_rate_increase", "canary.latency_p99_ratio"):
                    why.setdefault(gate, []).append(f"no request answered by the {name} release "
                                                    f"{traffic.release[:12]} in the log yet")
            if not traffic.answers:
                why.setdefault("canary.refusal_rate_increase", []).append(
                    f"no answer text of the {name} release in the log: start the server with --log-prompts")
            if not traffic.ratings:
                why.setdefault("canary.feedback_score_drop", []).append(
                    f"no feedback on the {name} release's answers yet (POST /v1/feedback)")
        return why


def canary_traffic(log_dir: Path, current: str, candidate: str) -> CanaryTraffic:
    """The two releases' figures from the logs in `log_dir` (closed files and the open ones)."""
    if not Path(log_dir).is_dir():
        raise FileNotFoundError(f"no server log directory {log_dir}: serve both releases with "
                                f"`llm-assets serve --candidate {candidate[:12]} --log-dir {log_dir}` (or set "
                                "stages.serving.canary.log_dir to the server's --log-dir)")
    digest = hashlib.sha256()
    by_release: dict[str, list[dict[str, Any]]] = {current: [], candidate: []}
    served_by: dict[str, str] = {}  # completion id -> release
    for where, record in read_log(log_dir, "requests"):
        release = record.get("release")
        if release in by_release:
            _check_request(where, record)
            by_release[release].append(record)
            digest.update(_canonical(record))
            if record.get("id"):
                served_by[record["id"]] = release
    ratings: dict[str, list[int]] = {current: [], candidate: []}
    for where, record in read_log(log_dir, "feedback"):
        release = served_by.get(record.get("completion_id"), record.get("release"))
        if release in ratings:
            if record.get("rating") not in (1, -1):
                raise ValueError(f"{where}: rating {record.get('rating')!r} is not 1 or -1; the server writes "
                                 "only those: repair or remove the line")
            ratings[release].append(record["rating"])
            digest.update(_canonical(record))
    return CanaryTraffic(release_traffic(current, by_release[current], ratings[current]),
                         release_traffic(candidate, by_release[candidate], ratings[candidate]), digest.hexdigest())


def release_traffic(release: str, records: Iterable[dict[str, Any]], ratings: list[int]) -> ReleaseTraffic:
    served = [r for r in records if r["endpoint"] in GENERATION_ENDPOINTS and not 400 <= r["status"] < 500]
    latencies = [r["latency_s"] for r in served if r["status"] < 400]
    answers = [text for r in served if r["status"] < 400 for text in r.get("completion") or []]
    return ReleaseTraffic(
        release=release, requests=len(served), errors=sum(r["status"] >= 500 for r in served),
        latency_p50_s=float(np.percentile(latencies, 50)) if latencies else NAN,
        latency_p99_s=float(np.percentile(latencies, 99)) if latencies else NAN,
        answers=len(answers), refusals=sum(map(is_refusal, answers)),
        ratings=len(ratings), feedback_score=sum(ratings) / len(ratings) if ratings else NAN,
    )


def _check_request(where: str, record: dict[str, Any]) -> None:
    for field, kind in (("endpoint", str), ("status", int), ("latency_s", (int, float))):
        if not isinstance(record.get(field), kind) or isinstance(record.get(field), bool):
            raise ValueError(f"{where}: request record without a valid {field!r} (got {record.get(field)!r}); "
                             "the server writes it on every record: repair or remove the line")
    if not math.isfinite(record["latency_s"]):
        raise ValueError(f"{where}: latency_s is {record['latency_s']}; repair or remove the line")


def _canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, ensure_ascii=False).encode() + b"\n"
