"""Server throughput under concurrent clients vs sequential `model.generate` calls, same model and prompts.

Builds a model of a manifest size (default tiny-1m of pipeline.yaml; untrained weights: throughput does
not depend on them) with a BPE tokenizer trained on a slice of the standard library, and 64 prompts cut
from the same files. Then generates greedily, --max-tokens tokens per prompt:
  (a) sequentially with `model.generate` (KV cache on), one prompt after another;
  (b) through the server (uvicorn on 127.0.0.1, in this process) with one client: HTTP and
      engine overhead, no batching;
  (c) through the server with --clients concurrent clients, which the engine batches.
Reports generated tokens/s of each and the ratios against (a). Clients run as threads of this
process, so they share its CPUs with the server; that counts against the server.
Each is timed --repeats times after a warm-up; the best run counts.
Usage: python bench/serve_throughput.py [--clients 16] [--max-tokens 48] [--size tiny-1m] [--max-batch-size 16]
       [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import uvicorn  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from bench._util import report, timed  # noqa: E402
from llm_assets.hf_models import save_hf  # noqa: E402
from llm_assets.manifest import TokenizerRecipe, load_manifest  # noqa: E402
from llm_assets.pretrain import build_model  # noqa: E402
from llm_assets.serving import ServeConfig, create_app  # noqa: E402
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


def through_server(url: str, texts: list[str], max_tokens: int, clients: int, repeats: int) -> tuple[float, int]:
    def complete(text: str) -> int:
        body = json.dumps({"prompt": text, "max_tokens": max_tokens, "temperature": 0}).encode()
        request = urllib.request.Request(f"{url}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())["usage"]["completion_tokens"]

    def run(texts: list[str]) -> int:
        with ThreadPoolExecutor(clients) as pool:
            return sum(pool.map(complete, texts))

    run(texts[:clients])  # warm-up
    return best_of(repeats, lambda: run(texts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients of the batched run")
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens generated per prompt")
    parser.add_argument("--size", default="tiny-1m", help="a model size of pipeline.yaml")
    parser.add_argument("--max-batch-size", type=int, default=16, help="the server's max_batch_size")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each; the best counts")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); on a busy machine 1 is "
                                                    "steadier: generate() stalls on every thread barrier")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    texts = prompts()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model_dir(Path(tmp), args.size)
        seq_s, seq_tokens = sequential_generate(model_dir, texts, args.max_tokens, args.repeats)

        config = ServeConfig(max_tokens=args.max_tokens, max_batch_size=args.max_batch_size, batch_wait_ms=5)
        app = create_app(model_dir, FAKE_SHA256, config)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        try:
            one_s, one_tokens = through_server(url, texts, args.max_tokens, 1, args.repeats)
            many_s, many_tokens = through_server(url, texts, args.max_tokens, args.clients, args.repeats)
        finally:
            server.should_exit = True
            thread.join()
            sock.close()

    seq_rate, one_rate, many_rate = seq_tokens / seq_s, one_tokens / one_s, many_tokens / many_s
    report(f"server vs sequential model.generate ({args.size}, {len(texts)} prompts, {args.max_tokens} tokens "
           f"each, {torch.get_num_threads()} torch threads)", [
        ("sequential generate", f"{seq_rate:.0f} tokens/s ({seq_tokens} tokens, {seq_s:.1f}s)"),
        ("server, 1 client", f"{one_rate:.0f} tokens/s ({one_tokens} tokens, {one_s:.1f}s): "
                             f"{one_rate / seq_rate:.2f}x generate"),
        (f"server, {args.clients} clients", f"{many_rate:.0f} tokens/s ({many_tokens} tokens, {many_s:.1f}s): "
                                            f"{many_rate / seq_rate:.2f}x generate, "
                                            f"{many_rate / one_rate:.2f}x 1 client (batches of up to "
                                            f"{args.max_batch_size})"),
    ])


if __name__ == "__main__":
    main()
