"""Importing a base model: the pure part, no Dagster.

A base model is read from a local directory, an S3 prefix or the Hugging Face hub. Only the files
a causal LM needs are imported (safetensors weights, config, generation config, tokenizer files,
chat template, licence and model card), so the artifact's hash is that of those files wherever
they came from. Weights in pickle form (`*.bin`, `*.pt`, ...) are refused and never read:
unpickling runs whatever code the file carries.
"""

from __future__ import annotations

import fnmatch
import math
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from llm_assets.store import hash_file

# What is imported, as globs over a path relative to the model's root; a glob without '/' matches
# top-level files only (a subfolder of a hub repo may hold other formats: onnx/, original/).
IMPORTED_FILES = (
    "*.safetensors", "model.safetensors.index.json",
    "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
    "chat_template.jinja", "chat_template.json", "additional_chat_templates/*.jinja",
    "LICENSE*", "LICENCE*", "NOTICE*", "README.md",
)
# The files one of which makes a tokenizer (fast, sentencepiece, BPE or WordPiece vocabulary).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class BaseModelError(ValueError):
    """A base model that cannot be imported; the message names the source, the file and the fix."""


def _imported(relpath: str) -> bool:
    return any(fnmatch.fnmatchcase(relpath, glob) and ("/" in glob or "/" not in relpath) for glob in IMPORTED_FILES)


def select_files(source: str, relpaths: Iterable[str]) -> list[str]:
    """The files of a model to import, from the names of all its files; refuses a model without
    config.json, without safetensors weights (naming its pickled weights when it has those) or
    without a tokenizer."""
    names = sorted(relpaths)
    chosen = [name for name in names if _imported(name)]
    if "config.json" not in chosen:
        raise BaseModelError(f"{source}: no config.json; a base model is a Hugging Face model directory "
                             "(save_pretrained writes config.json next to the weights)")
    if not any(name.endswith(".safetensors") for name in chosen):
        pickled = [name for name in names if name.endswith(PICKLE_SUFFIXES)]
        if pickled:
            raise BaseModelError(
                f"{source}: no safetensors weights, only pickled files ({', '.join(pickled)}), which are never "
                "loaded (unpickling runs any code the file carries); convert the weights to safetensors where you "
                "trust them (`model.save_pretrained(dir)` writes model.safetensors) and import that directory")
        raise BaseModelError(f"{source}: no *.safetensors weights; save the model with save_pretrained")
    if not any(name in TOKENIZER_FILES for name in chosen):
        raise BaseModelError(f"{source}: no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the model's "
                             "tokenizer into the directory with tokenizer.save_pretrained(dir)")
    return chosen


@dataclass(frozen=True)
class ModelSource:
    """Where a base model's files are read from, the files imported, and their signature: the
    content hashes of local files, the ETags of S3 objects (what changes when the file does)."""

    location: str
    files: list[str]
    signature: dict[str, str]
    local_dir: Path | None = None
    s3: Any = field(default=None, compare=False)  # the S3 client of an s3:// source

    def fetch(self, out: Path) -> None:
        """Copy (or download) the imported files into `out`."""
        for relpath in self.files:
            target = out / relpath
            target.parent.mkdir(parents=True, exist_ok=True)
            if self.local_dir is not None:
                shutil.copyfile(self.local_dir / relpath, target)
            else:
                bucket, prefix = _bucket_prefix(self.location)
                self.s3.download_file(bucket, prefix + relpath, str(target))


def local_source(path: Path, location: str | None = None) -> ModelSource:
    """A model directory on this machine; refuses a missing one."""
    location = location or str(path)
    if not path.is_dir():
        raise BaseModelError(f"{location}: no such directory; base_model names a model directory (relative to "
                             "the manifest), an s3://bucket/prefix, or a hub id such as org/name")
    files = select_files(location, (p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()))
    return ModelSource(location, files, {name: hash_file(path / name)[0] for name in files}, local_dir=path)


def _bucket_prefix(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    prefix = parsed.path.lstrip("/")
    return parsed.netloc, prefix if not prefix or prefix.endswith("/") else prefix + "/"


def s3_source(uri: str, client: Any) -> ModelSource:
    """A model directory under an S3 prefix; refuses one that cannot be listed or holds nothing."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = _bucket_prefix(uri)
    etags: dict[str, str] = {}
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            etags.update({obj["Key"][len(prefix):]: obj["ETag"].strip('"') for obj in page.get("Contents", [])})
    except (BotoCoreError, ClientError) as exc:  # unreachable endpoint, no such bucket, denied access
        raise BaseModelError(f"{uri}: cannot list the S3 prefix ({exc}); check the bucket, the credentials "
                             "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) and the endpoint (endpoint_url)") from exc
    if not etags:
        raise BaseModelError(f"{uri}: no objects under this S3 prefix; upload the model directory there first")
    files = select_files(uri, etags)
    return ModelSource(uri, files, {name: etags[name] for name in files}, s3=client)


def hub_source(repo_id: str) -> ModelSource:
    """A hub model, downloaded (only the files imported) into the Hugging Face cache; offline, the
    cached copy when there is one."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    offline = constants.HF_HUB_OFFLINE
    try:
        snapshot = snapshot_download(repo_id, allow_patterns=list(IMPORTED_FILES), local_files_only=offline)
    except LocalEntryNotFoundError as exc:
        raise BaseModelError(
            f"base_model {repo_id!r} is a hub id and this machine is offline (HF_HUB_OFFLINE=1 or no network): "
            f"download it first (`hf download {repo_id}` where the hub is reachable, into the same HF_HOME) "
            "or name its local directory or s3:// prefix") from exc
    except RepositoryNotFoundError as exc:
        raise BaseModelError(f"base_model {repo_id!r}: no such hub model (or it is gated: set HF_TOKEN); "
                             "a local directory is written as ./path or an absolute path") from exc
    return local_source(Path(snapshot), location=f"hub:{repo_id}")


def open_source(base_model: str, s3_client: Any = None) -> ModelSource:
    """The source a manifest's `base_model` names: an s3:// prefix, a local path (absolute once the
    manifest is loaded) or a hub id."""
    if base_model.startswith("s3://"):
        return s3_source(base_model, s3_client)
    if Path(base_model).is_absolute():
        return local_source(Path(base_model))
    return hub_source(base_model)


def check_model_dir(model_dir: Path, location: str) -> dict[str, Any]:
    """Refuse an imported directory whose config is not a causal LM's or whose tokenizer does not
    load; otherwise its figures: architecture, parameters (from the safetensors headers, nothing
    else is read), context length, chat template, licence."""
    from huggingface_hub import ModelCard
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (ValueError, OSError) as exc:  # an unknown model_type, malformed JSON
        raise BaseModelError(f"{location}/config.json: transformers cannot read it ({exc})") from exc
    causal = {name for names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
              for name in ((names,) if isinstance(names, str) else names)}
    architectures = list(config.architectures or [])
    if not set(architectures) & causal:
        raise BaseModelError(
            f"{location}/config.json: architectures {architectures or '(none)'} is not a causal language model "
            f"(model_type {config.model_type!r}); post-training needs one such as LlamaForCausalLM or "
            "Qwen2ForCausalLM; an encoder or seq2seq checkpoint cannot be a base model")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as exc:  # transformers raises many kinds for a broken tokenizer
        raise BaseModelError(f"{location}: the tokenizer files do not load ({type(exc).__name__}: {exc})") from exc
    parameters = 0
    for weights in sorted(model_dir.glob("*.safetensors")):
        with safe_open(weights, framework="pt") as tensors:
            for name in tensors.keys():  # noqa: SIM118 (safe_open is no mapping)
                shape = tensors.get_slice(name).get_shape()
                parameters += math.prod(shape)
    readme = model_dir / "README.md"
    licence = ModelCard.load(readme).data.get("license") if readme.is_file() else None
    return {
        "architecture": architectures[0],
        "model_type": config.model_type,
        "parameters": parameters,
        "max_position_embeddings": getattr(config, "max_position_embeddings", None),
        "vocab_size": len(tokenizer),
        "chat_template": tokenizer.chat_template is not None,
        **({"license": licence} if licence else {}),
    }
