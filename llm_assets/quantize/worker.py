"""One quantization as the worker process runs it: measure the full-precision model on held-out
text, quantize it, save it, load the result back with transformers and measure it the same way.

Runs in the quantization environment (torch, transformers, gptqmodel, optimum, torchao,
dagster-pipes; no Dagster). The asset writes a `QuantizeSpec` and two JSONL files of texts
(calibration from the training split, held-out from the test split); the worker writes the
quantized Hugging Face directory and reports its figures (`Reporter`). The quality figures of
the quantized model are measured on the directory as transformers loads it, not on the
in-memory result of the quantizer: what is measured is what a reader of the artifact gets.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from llm_assets.manifest import QuantScheme
from llm_assets.worker import Reporter, WorkerSpec, write_failure

SUMMARY_FILE = "quantization.json"
CALIBRATION_FILE = "calibration.jsonl"  # the calibration texts, kept in the artifact they shaped
GPTQ_LOG = "quant_log.csv"  # gptqmodel's per-module log; its losses move into SUMMARY_FILE
MODEL_FILES = ("config.json", "generation_config.json")  # what the quantizer writes besides weights
LIBRARIES = ("torch", "transformers", "gptqmodel", "optimum", "torchao")


class QuantizeSpec(WorkerSpec):
    scheme: QuantScheme
    model_dir: str  # the full-precision HF model directory (with its tokenizer)
    out_dir: str  # written by the worker: the quantized HF directory
    calibration: str | None = None  # JSONL of {"text": ...}: the calibration set (GPTQ only)
    heldout: str  # JSONL of {"text": ...}: where quality is measured
    max_tokens: int  # each text is cut to this many tokens
    group_size: int = 32  # GPTQ: columns sharing one scale
    seed: int = 0
    error_file: str | None = None  # the failure is written here, for the launcher's message


@dataclass(frozen=True)
class Quality:
    """Next-token prediction on held-out text: the figures compared before and after quantization."""

    nll: float  # mean negative log-likelihood, nats per token
    perplexity: float
    token_accuracy: float  # top-1 next-token accuracy
    tokens: int  # predicted tokens
    # Top-1 agreement with a reference model's predictions (the full-precision model's): more
    # sensitive to quantization error than perplexity, which noise can even lower.
    agreement: float | None = None


def read_texts(path: Path) -> list[str]:
    """The texts of a JSONL file of {"text": ...} records; a bad line is named."""
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            texts.append(json.loads(line)["text"])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{number}: expected a JSON object with a 'text' field ({exc})") from None
    if not texts:
        raise ValueError(f"{path}: no texts")
    return texts


def token_sequences(tokenizer: Any, texts: list[str], max_tokens: int, min_tokens: int = 2) -> list[list[int]]:
    """Each text's token ids cut to `max_tokens`; texts shorter than `min_tokens` are dropped."""
    ids = [tokenizer(text, truncation=True, max_length=max_tokens)["input_ids"] for text in texts]
    return [seq for seq in ids if len(seq) >= min_tokens]


def heldout_quality(
    model: Any, sequences: list[list[int]], reference: list[Any] | None = None
) -> tuple[Quality, list[Any]]:
    """Mean next-token NLL, perplexity and top-1 accuracy of `model` over the sequences, and its
    top-1 predictions (one tensor per sequence); with `reference` predictions, the agreement."""
    import torch

    nll, correct, agreed, tokens = 0.0, 0, 0, 0
    predictions = []
    model.eval()
    with torch.no_grad():
        for i, seq in enumerate(sequences):
            ids = torch.tensor([seq])
            logits = model(input_ids=ids).logits[0, :-1].float()
            targets = ids[0, 1:]
            predicted = logits.argmax(-1)
            nll += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
            correct += int((predicted == targets).sum())
            if reference is not None:
                agreed += int((predicted == reference[i]).sum())
            predictions.append(predicted)
            tokens += len(targets)
    if not tokens:
        raise ValueError("no held-out tokens to measure: every held-out text is shorter than 2 tokens")
    mean = nll / tokens
    quality = Quality(nll=mean, perplexity=math.exp(mean), token_accuracy=correct / tokens, tokens=tokens,
                      agreement=agreed / tokens if reference is not None else None)
    return quality, predictions


def weight_bytes(model_dir: Path) -> int:
    """Bytes of a model directory's weight files."""
    files = [p for p in model_dir.iterdir() if p.name.endswith(".safetensors")]
    if not files:
        raise FileNotFoundError(f"{model_dir}: no .safetensors weights")
    return sum(p.stat().st_size for p in files)


def carry_over(model_dir: Path, out_dir: Path) -> None:
    """Copy every file of the source directory that is not the model itself (the tokenizer, its
    chat template) over what the quantizer wrote: the quantized model talks as the original did."""
    for source in sorted(model_dir.iterdir()):
        if source.is_file() and source.name not in MODEL_FILES and ".safetensors" not in source.name:
            shutil.copy2(source, out_dir / source.name)


def quantize_gptq(model_dir: Path, out_dir: Path, calibration: list[list[int]], group_size: int) -> list[dict]:
    """GPTQ 4-bit (symmetric, per group of `group_size` input columns) with gptqmodel; returns
    its per-module reconstruction losses."""
    import torch

    # The default asks for more CPU workers than a small machine has (see STACK.md).
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(1, min(2, os.cpu_count() or 1))))
    from gptqmodel import GPTQModel, QuantizeConfig

    config = QuantizeConfig(
        bits=4, group_size=group_size, sym=True, desc_act=False,
        # "original" packs in torch; "cpu" would first compile a C++ extension (needs a compiler).
        pack_impl="gpu" if torch.cuda.is_available() else "original",
        # A relative path: gptqmodel records it in config.json, which must not vary run to run.
        offload_to_disk_path="gptqmodel-offload",
    )
    model = GPTQModel.load(str(model_dir), config)
    model.quantize([{"input_ids": seq, "attention_mask": [1] * len(seq)} for seq in calibration],
                   batch_size=min(8, len(calibration)))
    model.save(str(out_dir))
    log = out_dir / GPTQ_LOG
    layers = []
    if log.exists():  # its wall times would make the artifact differ run to run
        with log.open(newline="") as f:
            layers = sorted(({"layer": int(r["layer"]), "module": r["module"], "loss": float(r["loss"])}
                             for r in csv.DictReader(f)), key=lambda r: (r["layer"], r["module"]))
        log.unlink()
    return layers


def quantize_int8(model_dir: Path, out_dir: Path) -> None:
    """int8 weight-only (per-row scales) with torchao through transformers' TorchAoConfig."""
    import torch
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import AutoModelForCausalLM, TorchAoConfig

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, device_map="cpu",
        quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))
    model.save_pretrained(out_dir)


def canonical_safetensors_headers(out_dir: Path) -> None:
    """Sort the `__metadata__` of every safetensors file in place: safetensors writes that map in
    hash order, which differs run to run (torchao keeps one entry per tensor there), and a
    content-addressed artifact must not. Only the header's text changes, never its length or the
    tensor data after it."""
    for path in sorted(out_dir.glob("*.safetensors")):
        with path.open("r+b") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
            if "__metadata__" not in header:
                continue
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
            text = json.dumps(header, separators=(",", ":")).encode()
            if len(text) > size:  # a writer that used a more compact form: leave the file as it is
                continue
            f.seek(8)
            f.write(text + b" " * (size - len(text)))  # the format pads headers with spaces


def quantized_layers(model: Any) -> int:
    """Linear layers whose weights are stored quantized: GPTQ's packed layers, torchao's tensors."""
    import torch

    count = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if hasattr(module, "qweight"):
            count += 1
        elif isinstance(module, torch.nn.Linear) and weight is not None and type(weight.data) is not torch.Tensor:
            count += 1
    return count


def run(spec: QuantizeSpec) -> dict[str, Any]:
    reporter = Reporter.open()
    cwd = Path.cwd()
    spec = spec.model_copy(update=_absolute_paths(spec, cwd))
    try:
        # gptqmodel leaves its offload and log folders in the working directory: a scratch one.
        with tempfile.TemporaryDirectory(prefix="llm-assets-quantize-") as scratch:
            os.chdir(scratch)
            try:
                figures = _run(spec, reporter)
            finally:
                os.chdir(cwd)
        reporter.report(figures)
        return figures
    except BaseException as exc:
        write_failure(spec.error_file, exc)
        raise
    finally:
        reporter.close()


def _absolute_paths(spec: QuantizeSpec, cwd: Path) -> dict[str, str]:
    fields = ("model_dir", "out_dir", "calibration", "heldout", "error_file")
    return {name: str(cwd / getattr(spec, name)) for name in fields if getattr(spec, name) is not None}


def _quiet_libraries() -> None:
    """Keep the run's log to what matters: torchao announces every CUDA kernel library it cannot
    load on a CPU machine, and transformers draws a progress bar per model load."""
    import logging

    import transformers

    for noisy in ("torchao", "torch.utils._pytree"):  # the latter: torchao's enum registrations
        logging.getLogger(noisy).setLevel(logging.ERROR)
    transformers.utils.logging.disable_progress_bar()


def _run(spec: QuantizeSpec, reporter: Reporter) -> dict[str, Any]:
    _quiet_libraries()
    import torch
    from transformers import AutoTokenizer

    from llm_assets.hf_models import load_causal_lm

    torch.manual_seed(spec.seed)
    model_dir, out_dir = Path(spec.model_dir), Path(spec.out_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not a Hugging Face model directory (no config.json)")
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    heldout = token_sequences(tokenizer, read_texts(Path(spec.heldout)), spec.max_tokens)
    calibration: list[list[int]] = []
    if spec.scheme == "gptq-4bit":
        if spec.calibration is None:
            raise ValueError("gptq-4bit needs a calibration set: the spec has no `calibration` file")
        calibration = token_sequences(tokenizer, read_texts(Path(spec.calibration)), spec.max_tokens)
        if not calibration:
            raise ValueError(f"{spec.calibration}: every calibration text is shorter than 2 tokens")

    full = load_causal_lm(model_dir, "full-precision model")
    before, reference = heldout_quality(full, heldout)
    del full
    reporter.event("measured", f"full precision: perplexity {before.perplexity:.4f} on {before.tokens} held-out "
                               f"tokens; quantizing ({spec.scheme})")

    started = time.perf_counter()
    layers = []
    if spec.scheme == "gptq-4bit":
        layers = quantize_gptq(model_dir, out_dir, calibration, spec.group_size)
    else:
        quantize_int8(model_dir, out_dir)
    seconds = time.perf_counter() - started
    canonical_safetensors_headers(out_dir)
    carry_over(model_dir, out_dir)
    if spec.calibration is not None and calibration:
        shutil.copy2(spec.calibration, out_dir / CALIBRATION_FILE)

    reloaded = load_causal_lm(out_dir, f"{spec.scheme} result")
    after, _ = heldout_quality(reloaded, heldout, reference)
    quantized = quantized_layers(reloaded)
    if not quantized:
        raise RuntimeError(
            f"{out_dir}: transformers loaded no quantized layer: the {spec.scheme} result is not quantized"
        )
    reporter.event("measured", f"{spec.scheme}: perplexity {after.perplexity:.4f}, top-1 agreement with full "
                               f"precision {after.agreement:.4f}, {quantized} quantized layers")

    fp_bytes, q_bytes = weight_bytes(model_dir), weight_bytes(out_dir)
    calibration_figures = {
        "calibration_sha256": hashlib.sha256(Path(spec.calibration).read_bytes()).hexdigest(),
        "calibration_texts": len(calibration),
        "calibration_tokens": sum(map(len, calibration)),
    } if calibration else {}
    summary = {
        "scheme": spec.scheme,
        "method": (f"gptqmodel GPTQ, 4 bits, group size {spec.group_size}" if spec.scheme == "gptq-4bit"
                   else "torchao int8 weight-only, per-row scales"),
        "bits": 4 if spec.scheme == "gptq-4bit" else 8,
        "group_size": spec.group_size if spec.scheme == "gptq-4bit" else None,
        **calibration_figures,
        "full_precision": asdict(before),
        "quantized": asdict(after),
        "quantized_layers": quantized,
        "full_precision_weight_bytes": fp_bytes,
        "quantized_weight_bytes": q_bytes,
        "libraries": {name: version(name) for name in LIBRARIES},
        "gptq_layer_losses": layers,
    }
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=1, sort_keys=True))
    return {
        "scheme": spec.scheme,
        "bits": summary["bits"],
        **calibration_figures,
        "heldout_tokens": after.tokens,
        "full_precision_perplexity": round(before.perplexity, 6),
        "quantized_perplexity": round(after.perplexity, 6),
        # The gated figures: relative perplexity increase, and top-1 accuracy lost.
        "perplexity_increase": round(after.perplexity / before.perplexity - 1, 6),
        "accuracy_drop": round(before.token_accuracy - after.token_accuracy, 6),
        "full_precision_token_accuracy": round(before.token_accuracy, 6),
        "quantized_token_accuracy": round(after.token_accuracy, 6),
        "top1_agreement": round(after.agreement, 6),
        "quantized_layers": quantized,
        "full_precision_weight_bytes": fp_bytes,
        "quantized_weight_bytes": q_bytes,
        "size_ratio": round(q_bytes / fp_bytes, 4),
        "quantize_seconds": round(seconds, 2),
        "libraries": {"raw_value": summary["libraries"], "type": "json"},  # Pipes' form for a JSON value
    }
