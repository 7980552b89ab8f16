"""Where alerts go: an append-only JSONL file by default, and a Slack-compatible webhook."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

WEBHOOK_ENV = "LLM_ASSETS_ALERT_WEBHOOK_URL"


@dataclass(frozen=True)
class Alert:
    """One failed check evaluation or failed run, ready for any sink."""

    id: str
    kind: str  # "check_failed" | "run_failed"
    title: str
    description: str
    run_id: str
    timestamp: float
    asset: str | None = None
    partition: str | None = None
    check: str | None = None
    severity: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def as_text(self) -> str:
        where = f" {self.asset}" + (f"[{self.partition}]" if self.partition else "") if self.asset else ""
        lines = [f":rotating_light: *{self.title}*{where} (run {self.run_id[:8]})"]
        if self.description:
            lines.append(self.description)
        lines.extend(f"• {key}: {value}" for key, value in sorted(self.metadata.items()))
        return "\n".join(lines)


class AlertDeliveryError(Exception):
    """At least one sink could not take the alerts; they will be sent again on the next tick."""


class AlertSinksResource(dg.ConfigurableResource):
    """Delivers alerts to every configured sink; the JSONL file is always written first."""

    jsonl_path: str = Field(description="Append-only JSONL file that receives every alert")
    webhook_url: str | None = Field(
        default=None,
        description=f"Slack-compatible incoming-webhook URL (the default definitions read ${WEBHOOK_ENV})",
    )
    webhook_timeout_s: float = 10.0

    def send(self, alerts: list[Alert]) -> None:
        if not alerts:
            return
        self._append_jsonl(alerts)
        if self.webhook_url:
            self._post_webhook(alerts)

    def _append_jsonl(self, alerts: list[Alert]) -> None:
        path = Path(self.jsonl_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # A tick that failed on the webhook resends everything: skip what the file already has.
        seen = set()
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    seen.add(json.loads(line)["id"])
                except (ValueError, KeyError, TypeError):
                    continue
        fresh = [a for a in alerts if a.id not in seen]
        if not fresh:
            return
        with open(path, "a", encoding="utf-8") as handle:
            for alert in fresh:
                handle.write(json.dumps(asdict(alert), sort_keys=True, default=str) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def _post_webhook(self, alerts: list[Alert]) -> None:
        failures = []
        for alert in alerts:
            body = json.dumps({"text": alert.as_text()}).encode()
            request = urllib.request.Request(
                self.webhook_url, data=body, headers={"Content-Type": "application/json"}, method="POST"
            )
            try:
                with urllib.request.urlopen(request, timeout=self.webhook_timeout_s) as response:
                    response.read()
            except (urllib.error.URLError, TimeoutError, OSError) as exc:
                failures.append(f"{alert.id}: {exc}")
        if failures:
            raise AlertDeliveryError(
                f"webhook rejected {len(failures)} of {len(alerts)} alerts ({failures[0]}); "
                f"check {WEBHOOK_ENV}. The alerts are in {self.jsonl_path} and will be retried."
            )
