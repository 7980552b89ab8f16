"""Quantized vs full precision: size ratio and held-out perplexity delta of each scheme, with
plain round-to-nearest 4-bit as the peer GPTQ must beat.

Trains a small Llama (our loop, a BPE tokenizer) on modules of the Python standard library,
then runs the quantization worker in its environment (.venv-quant) for GPTQ 4-bit and int8,
exactly as quantized_model does: calibration from training files, quality on held-out files.
Round-to-nearest 4-bit (same group size, symmetric, no calibration) is applied here, in torch,
to the same model and measured by the same function.
Usage: python bench/quantize_vs_full_precision.py [--steps N] [--hidden D]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._util import report, timed  # noqa: E402
from llm_assets.data.stdlib_source import stdlib_root  # noqa: E402
from llm_assets.hf_models import save_hf  # noqa: E402
from llm_assets.manifest import ModelSize, TokenizerRecipe  # noqa: E402
from llm_assets.pretrain import TokenData, TrainConfig, build_model, train  # noqa: E402
from llm_assets.quantize.assets import write_texts  # noqa: E402
from llm_assets.quantize.worker import QuantizeSpec, heldout_quality, token_sequences  # noqa: E402
from llm_assets.settings import Settings  # noqa: E402
from llm_assets.tokenizer.bpe import save_hf_tokenizer as save_tokenizer  # noqa: E402
from llm_assets.tokenizer.bpe import train_bpe  # noqa: E402

MAX_TOKENS = 256


def stdlib_texts() -> tuple[list[str], list[str]]:
    """Top-level stdlib modules in ~2 KB pieces, split into train and held-out by file hash."""
    train, heldout = [], []
    for path in sorted(stdlib_root().glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        pieces = [text[i:i + 2000] for i in range(0, len(text), 2000)]
        held = hashlib.sha256(path.name.encode()).digest()[0] < 26  # about a tenth of the files
        (heldout if held else train).extend(pieces)
    return train, heldout


def round_to_nearest(model: torch.nn.Module, group_size: int, bits: int = 4) -> int:
    """Quantize-dequantize every decoder linear layer in place: symmetric, per group of input columns."""
    top = 2 ** (bits - 1) - 1
    layers = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                w = module.weight
                groups = w.reshape(w.shape[0], -1, group_size)
                scale = groups.abs().amax(-1, keepdim=True).clamp(min=1e-8) / top
                w.copy_((torch.clamp(torch.round(groups / scale), -top - 1, top) * scale).reshape_as(w))
                layers += 1
    return layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128,
                        help="GPTQ and RTN: columns per scale (GPTQ's usual 128)")
    args = parser.parse_args()
    python = Settings.from_env().quantize_python
    if not Path(python).is_file():
        sys.exit(f"no quantization environment at {python}: run `make install`")

    train_texts, heldout_texts = stdlib_texts()
    size = ModelSize(hidden_size=args.hidden, num_layers=args.layers, num_heads=args.hidden // 64,
                     intermediate_size=4 * args.hidden, vocab_size=2048, max_seq_len=MAX_TOKENS)
    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as scratch:
        root = Path(scratch)
        recipe = TokenizerRecipe(vocab_size=size.vocab_size)
        tokenizer = save_tokenizer(train_bpe(train_texts, recipe), recipe, root / "tokenizer")
        ids = np.array([t for text in train_texts for t in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]])
        model = build_model(size, seed=0)
        cfg = TrainConfig(steps=args.steps, batch_size=16, seq_len=128, learning_rate=3e-3, warmup_steps=20)
        train_seconds, _ = timed(lambda: train(model, TokenData(ids), None, cfg))
        model_dir = save_hf(model, root / "model", root / "tokenizer")
        print(f"trained {size.matmul_parameters() / 1e6:.1f}M matmul parameters for {args.steps} steps on "
              f"{len(ids) / 1e6:.1f}M tokens in {train_seconds:.0f}s; {len(heldout_texts)} held-out pieces")

        calibration = [train_texts[i] for i in np.random.default_rng(0).permutation(len(train_texts))[:128]]
        heldout = heldout_texts[:64]
        figures = {}
        for scheme in ("gptq-4bit", "int8"):
            spec = QuantizeSpec(
                scheme=scheme, model_dir=str(model_dir), out_dir=str(root / scheme), max_tokens=MAX_TOKENS,
                heldout=str(write_texts(root / "heldout.jsonl", heldout)),
                calibration=(str(write_texts(root / "calibration.jsonl", calibration))
                             if scheme == "gptq-4bit" else None),
                group_size=args.group_size, error_file=str(root / "error.txt"),
            )
            (root / "spec.json").write_text(spec.model_dump_json())
            done = subprocess.run([python, "-m", "llm_assets.quantize", "--spec", str(root / "spec.json")],
                                  capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{scheme} failed:\n{done.stderr[-3000:]}")
            line = next(x for x in done.stdout.splitlines() if x.startswith('{"event": "result"'))
            figures[scheme] = json.loads(line)["metadata"]

        # The peer: round-to-nearest 4-bit, measured on the same tokens by the same function.
        hf_tokenizer = AutoTokenizer.from_pretrained(model_dir)
        sequences = token_sequences(hf_tokenizer, heldout, MAX_TOKENS)
        rtn = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        full, reference = heldout_quality(rtn, sequences)
        round_to_nearest(rtn, args.group_size)
        rtn_quality, _ = heldout_quality(rtn, sequences, reference)

    gptq, int8 = figures["gptq-4bit"], figures["int8"]
    rtn_increase = rtn_quality.perplexity / full.perplexity - 1
    rows = [("model", f"{size.matmul_parameters() / 1e6:.1f}M matmul parameters, {args.steps} steps; "
                      f"group size {args.group_size}"),
            ("full-precision perplexity", f"{gptq['full_precision_perplexity']:.3f} "
                                          f"({gptq['heldout_tokens']} held-out tokens)")]
    for scheme, f in figures.items():
        rows += [
            (f"{scheme} size ratio", f"{f['size_ratio']:.3f} ({f['quantized_weight_bytes'] / 1e6:.2f} MB / "
                                     f"{f['full_precision_weight_bytes'] / 1e6:.2f} MB fp32)"),
            (f"{scheme} perplexity", f"{f['quantized_perplexity']:.3f} ({f['perplexity_increase']:+.3%}); "
                                     f"token accuracy {-f['accuracy_drop']:+.4f}; "
                                     f"quantized in {f['quantize_seconds']}s"),
            (f"{scheme} top-1 agreement", f"{f['top1_agreement']:.4f}"),
        ]
    rows += [
        ("round-to-nearest 4-bit perplexity", f"{rtn_quality.perplexity:.3f} ({rtn_increase:+.3%})"),
        ("round-to-nearest 4-bit top-1 agreement", f"{rtn_quality.agreement:.4f}"),
        # Disagreement with full precision: the error each method leaves (perplexity alone can
        # even fall under quantization noise on a small, undertrained model).
        ("GPTQ disagreement / RTN disagreement", f"{(1 - gptq['top1_agreement']) / (1 - rtn_quality.agreement):.3f}"
                                                 if rtn_quality.agreement < 1 else "RTN changed no prediction"),
        ("int8 disagreement / GPTQ disagreement", f"{(1 - int8['top1_agreement']) / (1 - gptq['top1_agreement']):.3f}"
                                                  if gptq["top1_agreement"] < 1 else "GPTQ changed no prediction"),
    ]
    report("quantized vs full precision", rows)


if __name__ == "__main__":
    main()
