"""The smoke test of a release's server: start the real server on 127.0.0.1 with the model the
release recorded, send the manifest's prompts, check the answers, stop it.

"From the model with the recorded hash" is checked twice: the server loads the model directory
only after the store has verified every file against that hash, and its greedy answer to the
first prompt must equal what transformers' `generate` answers from the same directory.
"""

from __future__ import annotations

import json
import secrets
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm_assets.serving.server import ServeConfig, create_app, running


@dataclass
class SmokeResult:
    problems: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _post(url: str, body: dict[str, Any], key: str | None) -> tuple[int, dict[str, Any], dict[str, str]]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}"), dict(error.headers)


def reference_answer(model_dir: Path, prompt: str, max_tokens: int) -> str:
    """transformers' own greedy answer: what the server must reproduce."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    encoded = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**encoded, max_new_tokens=max_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)


def smoke_test(model_dir: Path, model_sha256: str, prompts: list[str], max_tokens: int = 16) -> SmokeResult:
    started, result = time.perf_counter(), SmokeResult()
    key = secrets.token_hex(16)
    app = create_app(model_dir, model_sha256, ServeConfig(api_key=key, max_tokens=max(max_tokens, 16)))
    with running(app) as url:
        status, _, _ = _post(f"{url}/v1/completions", {"prompt": prompts[0], "max_tokens": 1}, None)
        if status != 401:
            result.problems.append(f"a request without the API key got {status}, not 401")
        for prompt in prompts:
            status, body, headers = _post(f"{url}/v1/completions",
                                          {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}, key)
            if status != 200:
                result.problems.append(f"{prompt!r}: status {status}: {body.get('error', {}).get('message')}")
                continue
            served = {body.get("model"), headers.get("x-model-sha256")}
            if served != {model_sha256}:
                result.problems.append(f"{prompt!r}: answered by {served}, not the recorded {model_sha256[:12]}")
            if body["usage"]["completion_tokens"] < 1:
                result.problems.append(f"{prompt!r}: no token generated")
            result.answers.append(body["choices"][0]["text"])
    if result.answers and result.answers[0] != (expected := reference_answer(model_dir, prompts[0], max_tokens)):
        result.problems.append(f"{prompts[0]!r}: the server answered {result.answers[0]!r}, the model itself "
                               f"{expected!r}: the server does not serve this model as it is")
    result.seconds = time.perf_counter() - started
    return result
