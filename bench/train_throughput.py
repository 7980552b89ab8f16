"""Pretraining loop overhead vs a bare torch loop, and MFU against this machine's matmul peak.

The same model (Llama: hidden 256, 4 layers, seq 256, batch 8, vocab 8192) trains on the same
batches (a) with `llm_assets.pretrain.train` and (b) with a minimal loop (forward, backward,
AdamW step, zero_grad), in fp32 and in bf16 autocast; each is timed by wall clock after warm-up
steps, best of --repeats. The peak is a large torch.matmul (2·n³ FLOPs) in each dtype; MFU is
6·N·tokens/s over that peak (N = ModelSize.matmul_parameters(); attention scores not counted).
Usage: python bench/train_throughput.py [--steps 6] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench._util import report, timed  # noqa: E402
from llm_assets.manifest import ModelSize  # noqa: E402
from llm_assets.pretrain import TokenBatches, TokenData, TrainConfig, build_model, flops_per_token, train  # noqa: E402

SIZE = ModelSize(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=768, vocab_size=8192, max_seq_len=256)
SEQ_LEN, BATCH, WARMUP_STEPS = 256, 8, 2


def peak_matmul_flops(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.matmul(a, b)  # warm-up: kernel selection, allocations
    best = min(timed(lambda: torch.matmul(a, b))[0] for _ in range(reps))
    return 2 * n**3 / best


def config(steps: int, precision: str) -> TrainConfig:
    # No eval, no checkpoint, no warmup: only the per-step work of the loop is compared.
    return TrainConfig(steps=steps, batch_size=BATCH, seq_len=SEQ_LEN, learning_rate=3e-4, eval_every=0,
                       eval_batches=1, checkpoint_every=0, precision=precision)


def ours(data: TokenData, steps: int, precision: str) -> float:
    """Seconds per step of train(), warm-up steps excluded (they run in a first call)."""
    train(build_model(SIZE, seed=0), data, None, config(WARMUP_STEPS, precision))
    model = build_model(SIZE, seed=0)
    seconds, _ = timed(lambda: train(model, data, None, config(steps, precision)))
    return seconds / steps


def plain(batches: list[torch.Tensor], precision: str) -> float:
    """Seconds per step of the minimal loop on the same batches."""
    model = build_model(SIZE, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)

    def step(batch: torch.Tensor) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(input_ids=batch[:, :-1]).logits
        F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for batch in batches[:WARMUP_STEPS]:
        step(batch)
    started = time.perf_counter()
    for batch in batches:
        step(batch)
    return (time.perf_counter() - started) / len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = TokenData(np.random.default_rng(0).integers(0, SIZE.vocab_size, 2_000_000, dtype=np.uint16))
    # The batches train() reads for a run of --steps steps: the plain loop gets the very same.
    batcher = TokenBatches(data, seq_len=SEQ_LEN, global_batch=BATCH, seed=0)
    batches = [batcher.rows(step, slice(None)) for step in range(args.steps)]
    tokens_per_step = BATCH * SEQ_LEN
    model_flops_per_step = flops_per_token(SIZE) * tokens_per_step

    peaks = {"fp32": peak_matmul_flops(torch.float32), "bf16": peak_matmul_flops(torch.bfloat16)}
    rows = [("model", f"N = {SIZE.matmul_parameters() / 1e6:.2f}M matmul params, {tokens_per_step} tokens/step, "
                      f"{model_flops_per_step / 1e9:.1f} GFLOP/step, {args.threads} threads"),
            ("peak matmul fp32", f"{peaks['fp32'] / 1e9:8.1f} GFLOP/s (2048² torch.matmul)"),
            ("peak matmul bf16", f"{peaks['bf16'] / 1e9:8.1f} GFLOP/s ({peaks['bf16'] / peaks['fp32']:.2f}× fp32; "
                                 "well above 1 only with bf16 matrix units: AMX, tensor cores)")]
    for precision in ("fp32", "bf16"):
        # Interleaved repeats, best of each: both loops see the same machine noise.
        ours_s = plain_s = float("inf")
        for _ in range(args.repeats):
            plain_s = min(plain_s, plain(batches, precision))
            ours_s = min(ours_s, ours(data, args.steps, precision))
        for name, seconds in (("plain torch loop", plain_s), ("llm_assets train()", ours_s)):
            achieved = model_flops_per_step / seconds
            rows.append((f"{precision} {name}",
                         f"{tokens_per_step / seconds:8.0f} tokens/s  {seconds * 1e3:7.0f} ms/step  "
                         f"{achieved / 1e9:6.1f} GFLOP/s  MFU {achieved / peaks[precision]:6.1%}"))
        rows.append((f"{precision} overhead of train()", f"{ours_s / plain_s - 1:+.1%} time per step"))
    report(f"pretraining throughput ({args.steps} steps, best of {args.repeats})", rows)


if __name__ == "__main__":
    main()
