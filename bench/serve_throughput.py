"""Server throughput under concurrent streaming clients vs sequential `model.generate` calls, same model and prompts.

Builds a model of a manifest size (default tiny-1m of pipeline.yaml; untrained weights: throughput does
not depend on them) with a BPE tokenizer trained on a slice of the standard library, and 64 prompts cut
from the same files. Then generates greedily, --max-tokens tokens per prompt (greedy: every run generates
the same tokens):
  (a) sequentially with `model.generate` (KV cache on), one prompt after another, in this process;
  (b) with transformers' own continuous batching, `model.generate_batch` over all prompts at once;
  (c) through the server, run as `serve` in a process of its own on 127.0.0.1 (the same --threads
      torch threads as (a)), with --clients concurrent streaming clients: asyncio tasks of this
      process reading the server-sent events with httpx. Aggregate tokens/s (the usage chunk's
      completion tokens over the wall time) and time to first token (p50, p99);
  (d) a short request (4 tokens) sent while a long one (--max-tokens) streams, vs the same short one alone:
      continuous batching lets it join the running batch instead of waiting for the long one.
Reports generated tokens/s of each and the ratios against (a). The client process shares the
machine's CPUs with the server: that counts against the server.
Each of (a)-(c) is timed --repeats times after a warm-up; the best run counts.
Usage: python bench/serve_throughput.py [--clients 8] [--max-tokens 48] [--size tiny-1m] [--max-batch-size 16]
       [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig  # noqa: E402

from bench._util import report, timed  # noqa: E402
from llm_assets.hf_models import save_hf  # noqa: E402
from llm_assets.manifest import TokenizerRecipe, load_manifest  # noqa: E402
from llm_assets.pretrain import build_model  # noqa: E402
from llm_assets.serving import ServeConfig, serve  # noqa: E402
from llm_assets.settings import PROJECT_ROOT  # noqa: E402
from llm_assets.tokenizer.bpe import save_hf_tokenizer as save_tokenizer  # noqa: E402
from llm_assets.tokenizer.bpe import train_bpe  # noqa: E402

PROMPTS = 64
FAKE_SHA256 = "0" * 64  # the bench's model is no artifact; the server only reports the hash


def stdlib_texts() -> list[str]:
    root = Path(json.__file__).parent.parent
    return [p.read_text(encoding="utf-8") for pkg in ("json", "email") for p in sorted((root / pkg).glob("*.py"))]


def build_model_dir(out: Path, size_name: str) -> Path:
    size = load_manifest(PROJECT_ROOT / "pipeline.yaml").model_sizes[size_name]
    texts = stdlib_texts()
    recipe = TokenizerRecipe(vocab_size=size.vocab_size)
    save_tokenizer(train_bpe(texts, recipe), recipe, out / "tokenizer")
    return save_hf(build_model(size, seed=0), out / "model", out / "tokenizer")


def prompts() -> list[str]:
    """Lines of 20 to 120 characters from the standard library: prompts of varied length."""
    lines = [line.strip() for text in stdlib_texts() for line in text.splitlines() if 20 <= len(line.strip()) <= 120]
    return lines[:: max(1, len(lines) // PROMPTS)][:PROMPTS]


def best_of(repeats: int, run: Callable[[], int]) -> tuple[float, int]:
    """The fastest of `repeats` timed runs (seconds, tokens): this machine's load only slows runs down."""
    return min(timed(run) for _ in range(repeats))


def sequential_generate(model_dir: Path, texts: list[str], max_tokens: int, repeats: int) -> tuple[float, int]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()

    def run(texts: list[str]) -> int:
        tokens = 0
        with torch.inference_mode():
            for text in texts:
                encoded = tokenizer(text, return_tensors="pt")
                out = model.generate(**encoded, max_new_tokens=max_tokens, do_sample=False, use_cache=True,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
                tokens += out.shape[1] - encoded["input_ids"].shape[1]
        return tokens

    run(texts[:4])  # warm-up
    return best_of(repeats, lambda: run(texts))


def transformers_continuous_batching(model_dir: Path, texts: list[str], max_tokens: int, repeats: int
                                     ) -> tuple[float, int]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    config = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    inputs = [tokenizer(text)["input_ids"] for text in texts]

    def run(inputs: list[list[int]]) -> int:
        outputs = model.generate_batch(inputs=inputs, generation_config=config)  # it fails under inference_mode
        return sum(len(out.generated_tokens) for out in outputs.values())

    run(inputs[:4])  # warm-up
    return best_of(repeats, lambda: run(inputs))


@contextlib.contextmanager
def server_process(model_dir: Path, max_tokens: int, max_batch_size: int, threads: int) -> Iterator[str]:
    """This script's `--serve` mode in a process of its own; yields the base URL once /health answers."""
    with socket.socket() as sock:  # a free port; the server binds it a moment later
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, __file__, "--serve", str(model_dir), "--port", str(port), "--threads", str(threads),
               "--max-tokens", str(max_tokens), "--max-batch-size", str(max_batch_size)]
    process = subprocess.Popen(command)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server process exited with {process.returncode}; see its log above")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("the server process did not answer /health within 120s")
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=60)


async def stream_completion(client: httpx.AsyncClient, text: str, max_tokens: int) -> tuple[int, float]:
    """(completion tokens, seconds to the first text) of one streamed greedy completion."""
    started, first = time.perf_counter(), None
    body = {"prompt": text, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise RuntimeError(f"the server failed mid-stream: {chunk['error']}")
            if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter() - started
            if chunk.get("usage"):
                ended = time.perf_counter() - started
                return chunk["usage"]["completion_tokens"], first if first is not None else ended
    raise RuntimeError("the stream ended without its usage chunk")


async def clients_run(url: str, texts: list[str], max_tokens: int, clients: int) -> tuple[int, list[float]]:
    """`clients` concurrent streams over the prompts: (tokens, times to first token)."""
    pending = iter(texts)
    answers: list[tuple[int, float]] = []

    async def client_loop(client: httpx.AsyncClient) -> None:
        for text in pending:  # every client takes the next prompt as soon as its stream ends
            answers.append(await stream_completion(client, text, max_tokens))

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
    return sum(tokens for tokens, _ in answers), [first for _, first in answers]


def streaming_clients(url: str, texts: list[str], max_tokens: int, clients: int, repeats: int
                      ) -> tuple[float, int, list[float]]:
    """(seconds, tokens, times to first token) of the best run."""
    asyncio.run(clients_run(url, texts[:clients], max_tokens, clients))  # warm-up
    runs = [timed(lambda: asyncio.run(clients_run(url, texts, max_tokens, clients))) for _ in range(repeats)]
    seconds, (tokens, firsts) = min(runs, key=lambda run: run[0])
    return seconds, tokens, firsts


def short_beside_long(url: str, long_text: str, max_tokens: int) -> tuple[float, float]:
    """Seconds a 4-token request takes alone, and while a --max-tokens request streams."""
    with httpx.Client(base_url=url, timeout=300) as client:
        def short() -> float:
            body = {"prompt": "def", "max_tokens": 4, "temperature": 0}
            return timed(lambda: client.post("/v1/completions", json=body).raise_for_status())[0]

        alone = min(short() for _ in range(3))
        body = {"prompt": long_text, "max_tokens": max_tokens, "temperature": 0, "stream": True}
        with httpx.Client(base_url=url, timeout=300) as other, other.stream("POST", "/v1/completions",
                                                                           json=body) as stream:
            lines = stream.iter_lines()
            next(line for line in lines if line.startswith("data: "))  # the long one is being decoded
            beside = short()
            for _ in lines:
                pass
    return alone, beside


def serve_main(args: argparse.Namespace) -> None:
    """--serve: the server alone in this process, as `llm-assets serve` runs it."""
    serve(Path(args.serve), FAKE_SHA256, port=args.port,
          config=ServeConfig(max_tokens=args.max_tokens, max_batch_size=args.max_batch_size))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8, help="concurrent streaming clients")
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens generated per prompt")
    parser.add_argument("--size", default="tiny-1m", help="a model size of pipeline.yaml")
    parser.add_argument("--max-batch-size", type=int, default=16, help="the server's max_batch_size")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each; the best counts")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads of the sequential baseline and of the server (default: torch's)")
    parser.add_argument("--serve", metavar="MODEL_DIR", help=argparse.SUPPRESS)  # the server process's mode
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.serve:
        serve_main(args)
        return
    texts = prompts()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model_dir(Path(tmp), args.size)
        seq_s, seq_tokens = sequential_generate(model_dir, texts, args.max_tokens, args.repeats)
        cb_s, cb_tokens = transformers_continuous_batching(model_dir, texts, args.max_tokens, args.repeats)
        with server_process(model_dir, args.max_tokens, args.max_batch_size, args.threads) as url:
            many_s, many_tokens, firsts = streaming_clients(url, texts, args.max_tokens, args.clients, args.repeats)
            alone, beside = short_beside_long(url, texts[0], args.max_tokens)

    seq_rate, cb_rate, many_rate = seq_tokens / seq_s, cb_tokens / cb_s, many_tokens / many_s
    cuts = statistics.quantiles(firsts, n=100)
    report(f"server vs sequential model.generate ({args.size}, {len(texts)} prompts, {args.max_tokens} tokens "
           f"each, {args.threads} torch threads in each process)", [
        ("sequential generate", f"{seq_rate:.0f} tokens/s ({seq_tokens} tokens, {seq_s:.1f}s)"),
        ("transformers generate_batch", f"{cb_rate:.0f} tokens/s ({cb_tokens} tokens, {cb_s:.1f}s): "
                                        f"{cb_rate / seq_rate:.2f}x generate"),
        (f"server process, {args.clients} streaming clients", f"{many_rate:.0f} tokens/s ({many_tokens} tokens, "
                                                              f"{many_s:.1f}s): {many_rate / seq_rate:.2f}x "
                                                              f"generate (running batch of up to "
                                                              f"{args.max_batch_size})"),
        ("time to first token", f"p50 {cuts[49] * 1000:.0f} ms, p99 {cuts[98] * 1000:.0f} ms"),
        ("short request (4 tokens)", f"alone {alone * 1000:.0f} ms, beside a {args.max_tokens}-token stream "
                                     f"{beside * 1000:.0f} ms"),
    ])


if __name__ == "__main__":
    main()
