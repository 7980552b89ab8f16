"""The GPU path, checked on a machine with NVIDIA GPUs; prints the figures docs/training.md records.

    .venv/bin/python scripts/gpu_checks.py [--steps 50] [--skip-gptq]

1. peak: FLOP/s of a large matmul, fp32 and bf16, per GPU: the MFU denominators.
2. bf16 training: the pretraining loop (`llm_assets.pretrain.train`) on one GPU, precision bf16,
   on a small Llama; tokens/s and MFU against the measured bf16 peak; the loss must fall.
3. FSDP2 on all GPUs: the same run under torchrun with `parallelism: fsdp`, one rank per GPU;
   its losses must match the one-GPU run's (bf16 tolerance) and its checkpoint load into a plain model.
4. gptqmodel on CUDA: the trained model quantized to 4-bit GPTQ by the quantization worker's own
   function, in the quantization environment ($LLM_ASSETS_QUANTIZE_PYTHON), then reloaded.

Without a CUDA device it says so and exits with status 2: nothing here runs on a CPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llm_assets.hf_models import save_hf  # noqa: E402
from llm_assets.manifest import ModelSize  # noqa: E402
from llm_assets.pretrain import TokenData, TrainConfig, build_model, load_checkpoint, train  # noqa: E402
from llm_assets.pretrain.job import measured_peak_flops, summary  # noqa: E402
from llm_assets.settings import Settings  # noqa: E402

EXIT_NO_GPU = 2
# About 60M parameters: big enough that matmuls dominate, small enough for seconds per check.
SIZE = ModelSize(hidden_size=768, num_layers=8, num_heads=12, num_kv_heads=4, intermediate_size=2048,
                 vocab_size=8192, max_seq_len=512)


def markov_tokens(n: int, seed: int, vocab: int = SIZE.vocab_size, branching: int = 8) -> np.ndarray:
    """A random walk on a sparse chain: a corpus a model can learn (best loss ln(branching))."""
    successors = np.random.default_rng(1234).integers(0, vocab, size=(vocab, branching))
    choices = np.random.default_rng(seed).integers(0, branching, size=n)
    tokens = np.empty(n, dtype=np.uint16)
    token = 0
    for i in range(n):
        tokens[i] = token
        token = successors[token, choices[i]]
    return tokens


def check_peak() -> dict[str, float]:
    device = torch.device("cuda", 0)
    peaks = {p: measured_peak_flops(p, device) for p in ("fp32", "bf16")}
    print(f"[peak] {torch.cuda.get_device_name(device)}: fp32 {peaks['fp32'] / 1e12:.1f} TFLOP/s, "
          f"bf16 {peaks['bf16'] / 1e12:.1f} TFLOP/s (torch.matmul, 4096²)")
    return peaks


def check_bf16_training(cfg: TrainConfig, data: Path, out: Path) -> dict:
    device = torch.device("cuda", 0)
    train_tokens, val_tokens = np.fromfile(data / "train.bin", np.uint16), np.fromfile(data / "val.bin", np.uint16)
    model = build_model(SIZE, seed=cfg.seed).to(device)
    result = train(model, TokenData(train_tokens), TokenData(val_tokens), cfg)
    figures = summary(result, SIZE, device, world_size=1)
    save_hf(model, out)
    print(f"[bf16] {cfg.steps} steps: loss {figures['initial_loss']} -> {figures['final_train_loss']}, "
          f"{figures['tokens_per_second']:.0f} tokens/s, MFU {figures['mfu']:.3f} of the measured bf16 peak")
    if not figures["final_train_loss"] < figures["initial_loss"]:
        raise SystemExit("[bf16] FAILED: the loss did not fall")
    return {"losses": [r.loss for r in result.history], **{k: figures[k] for k in ("tokens_per_second", "mfu")}}


def check_fsdp(cfg: TrainConfig, data: Path, scratch: Path, reference: list[float]) -> dict:
    gpus = torch.cuda.device_count()
    if cfg.batch_size % gpus:
        raise SystemExit(f"[fsdp] batch size {cfg.batch_size} does not split over {gpus} GPUs")
    per_rank = cfg.replace(batch_size=cfg.batch_size // gpus, parallelism="fsdp")
    spec = {"model": SIZE.model_dump(), "train": per_rank.model_dump(mode="json"),
            "train_bins": [str(data / "train.bin")], "val_bins": [str(data / "val.bin")], "token_dtype": "uint16",
            "checkpoint_dir": str(scratch / "checkpoints"), "result": str(scratch / "result.json")}
    (scratch / "spec.json").write_text(json.dumps(spec))
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
                           "-m", "llm_assets.pretrain", "--spec", str(scratch / "spec.json")],
                          cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"[fsdp] FAILED:\n{done.stderr[-3000:]}")
    result = json.loads((scratch / "result.json").read_text())
    losses = [r["loss"] for r in result["history"]]
    # The checkpoint was gathered whole from the shards: a plain model on one device loads it.
    load_checkpoint(scratch / "checkpoints" / f"step_{cfg.steps:08d}", model=build_model(SIZE, seed=0))
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses, reference, strict=True))
    print(f"[fsdp] {gpus} GPU(s), one rank each: {result['tokens_per_second']:.0f} tokens/s, "
          f"{time.perf_counter() - started:.0f} s with start-up; largest relative loss difference to one GPU "
          f"{worst:.2e}" + (" (one GPU: FSDP shards nothing, this is the one-process loop)" if gpus == 1 else ""))
    if worst > 2e-2:  # bf16 sums in another order over ranks: close, not equal
        raise SystemExit("[fsdp] FAILED: the sharded run's losses differ from the one-GPU run's")
    return {"gpus": gpus, "tokens_per_second": result["tokens_per_second"], "max_rel_loss_diff": worst}


def check_gptq(model_dir: Path, scratch: Path) -> dict:
    """The quantization worker's GPTQ on CUDA, in its own environment (gptqmodel's protobuf)."""
    python = Settings.from_env().quantize_python
    if not Path(python).exists():
        raise SystemExit(f"[gptq] no quantization environment at {python}: `make quant-env`, or set "
                         f"LLM_ASSETS_QUANTIZE_PYTHON")
    script = f"""
import json, time, torch
from pathlib import Path
from transformers import AutoModelForCausalLM
from llm_assets.quantize.worker import quantize_gptq, quantized_layers
assert torch.cuda.is_available(), "the quantization environment's torch does not see the GPU"
calibration = [[int(t) for t in torch.randint(0, {SIZE.vocab_size}, (256,))] for _ in range(32)]
started = time.perf_counter()
quantize_gptq(Path({str(model_dir)!r}), Path({str(scratch / 'gptq')!r}), calibration, group_size=128)
seconds = time.perf_counter() - started
model = AutoModelForCausalLM.from_pretrained({str(scratch / 'gptq')!r}, device_map="cuda:0")
logits = model(torch.tensor([calibration[0]], device="cuda:0")).logits
print(json.dumps({{"seconds": seconds, "layers": quantized_layers(model), "finite": bool(logits.isfinite().all())}}))
"""
    done = subprocess.run([python, "-c", script], cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"[gptq] FAILED:\n{done.stderr[-3000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"[gptq] 4-bit GPTQ on CUDA in {figures['seconds']:.1f} s, {figures['layers']} quantized layers, "
          f"reloaded logits finite: {figures['finite']}")
    if not (figures["layers"] and figures["finite"]):
        raise SystemExit("[gptq] FAILED: no quantized layer, or non-finite logits after reload")
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--skip-gptq", action="store_true", help="no quantization environment on this machine")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_checks: no CUDA device on this machine (torch.cuda.is_available() is False); "
              "run this on a GPU machine: nothing was measured", file=sys.stderr)
        return EXIT_NO_GPU
    gpus = torch.cuda.device_count()
    cfg = TrainConfig(steps=args.steps, batch_size=8 * gpus, seq_len=512, learning_rate=1e-3,
                      warmup_steps=min(10, args.steps), eval_every=0, eval_batches=2, checkpoint_every=0,
                      precision="bf16")
    figures: dict[str, object] = {"device": torch.cuda.get_device_name(0), "gpus": gpus, "torch": torch.__version__}
    with tempfile.TemporaryDirectory(prefix="gpu-checks-") as tmp:
        scratch = Path(tmp)
        markov_tokens(4_000_000, seed=1).tofile(scratch / "train.bin")
        markov_tokens(200_000, seed=2).tofile(scratch / "val.bin")
        figures["peak_flops"] = check_peak()
        figures["bf16"] = check_bf16_training(cfg, scratch, scratch / "model")
        figures["fsdp"] = check_fsdp(cfg, scratch, scratch, figures["bf16"].pop("losses"))
        if not args.skip_gptq:
            figures["gptq"] = check_gptq(scratch / "model", scratch)
    print(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
