"""Fixtures: the evaluation tests' tiny trained model (imported, not copied), served-traffic texts in
and out of its training distribution, and log files written as the server writes them."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from llm_assets.prompts import render_prompt

# The same tiny model and held-out frame the evaluation tests build.
from llm_assets_tests.evaluation.conftest import DOCSTRINGS, heldout, tokenizer_dir, trained_dir  # noqa: F401

# Prompts like the model's training data: questions about the shapes' documented methods.
IN_DISTRIBUTION = [render_prompt([{"role": "user", "content": f"What does `{name}` do?"}]) for name in DOCSTRINGS
                   if name != "<module>"] + [text.split("\n")[0] for text in DOCSTRINGS.values()]
# Traffic the model never saw: another language and another domain.
SHIFTED = [
    "Quelle est la meilleure recette de la tarte aux pommes de ma grand-mère ?",
    "Wie spät ist es jetzt in Tokio, und regnet es dort heute?",
    "SELECT customer_id, SUM(amount) FROM invoices GROUP BY customer_id HAVING SUM(amount) > 1000;",
    "Zhè ge xīngqī de tiānqì zěnme yàng? Wǒ xiǎng qù gōngyuán.",
    "¿Dónde está la estación de tren más cercana al museo del Prado?",
    "Kérem, foglaljon asztalt két főre holnap este hét órára.",
] * 2


def request_record(at: datetime, prompt: str | None, *, status: int = 200, latency: float = 0.05,
                   release: str = "r" * 64, rid: str | None = None, completion: str = "It is.") -> dict[str, Any]:
    """One request record as the server logs it (the prompt only with --log-prompts)."""
    record = {"time": at.isoformat(), "id": rid or f"cmpl-{at.timestamp():.6f}", "endpoint": "/v1/completions",
              "status": status, "error": None if status < 400 else "internal_error", "latency_s": latency,
              "prompt_tokens": 5, "completion_tokens": 7, "model": "m" * 64, "release": release, "scheme": None,
              "stream": False, "choices": 1, "finish_reasons": ["length"], "first_token_s": latency / 5}
    if prompt is not None:
        record.update(prompt=prompt, completion=[completion])
    return record


def feedback_record(at: datetime, completion_id: str, rating: int, correction: str | None = None,
                    release: str = "r" * 64) -> dict[str, Any]:
    return {"time": at.isoformat(), "id": f"fb-{at.timestamp():.6f}", "completion_id": completion_id,
            "rating": rating, "correction": correction, "model": "m" * 64, "release": release}


def write_log(log_dir: Path, log: str, opened: datetime, records: list[dict[str, Any]], *, closed: bool = True) -> Path:
    """A log file named as the server names it, closed (`.jsonl`) or still open (`.jsonl.open`)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    name = f"{log}-{opened.strftime('%Y%m%dT%H%M%S.%fZ')}.jsonl" + ("" if closed else ".open")
    path = log_dir / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def spread(start: datetime, count: int, seconds: float = 30) -> list[datetime]:
    return [start + timedelta(seconds=seconds * i) for i in range(count)]
