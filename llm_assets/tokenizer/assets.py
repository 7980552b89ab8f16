"""tokenizer, token_shards and heldout_tokens: the corpus as token ids."""

import json
from pathlib import Path

import dagster as dg
import polars as pl
from tokenizers import Tokenizer

from llm_assets.artifacts import (
    InputRead,
    artifact_asset,
    describe_input_problem,
    input_problems,
    materialize_artifact,
    part_digest,
)
from llm_assets.checks.scope import artifacts_under_check
from llm_assets.data.dataset_splits import HELD_OUT, train_path
from llm_assets.data.partitions import corpus_shards
from llm_assets.manifest import PipelineManifest, TokenizerRecipe
from llm_assets.store import ArtifactStore
from llm_assets.tokenizer.bpe import round_trip_failures, save_hf_tokenizer, train_bpe
from llm_assets.tokenizer.packing import META_FILE, pack_documents, packing_problems
from resources.artifact_store_resource import ArtifactStoreResource
from resources.handles import ArtifactHandle, consumed_hash
from resources.pipeline import PipelineResource

TOKENIZER_FILE = "tokenizer.json"


def sample_training_text(splits_root: Path, sample_mb: float) -> list[str]:
    """A deterministic sample of about ``sample_mb`` of training text, spread over every shard.

    A document is in the sample when its sha256, read as a fraction, falls below
    sample / total: the same documents whatever the shard layout, in a stable order.
    """
    parts = sorted((splits_root / "train").glob("*.parquet"))
    total = sum(
        int(pl.read_parquet(p, columns=["text"])["text"].str.len_bytes().sum() or 0) for p in parts
    )
    fraction = min(1.0, sample_mb * 1e6 / total) if total else 1.0
    threshold = int(fraction * 2**32)
    texts: list[str] = []
    for part in parts:
        frame = pl.read_parquet(part, columns=["sha256", "text"])
        chosen = frame.filter(pl.col("sha256").str.slice(0, 8).str.to_integer(base=16) < threshold)
        texts.extend(chosen.sort("sha256")["text"].to_list())
    return texts


def stored_tokenizer(store: ArtifactStore, handle: ArtifactHandle) -> Tokenizer:
    """The tokenizer artifact as a `tokenizers.Tokenizer` (the fast path for encoding shards)."""
    return Tokenizer.from_file(str(store.local_dir(handle.sha256) / TOKENIZER_FILE))


@artifact_asset(
    code_version="1",
    kinds={"huggingface"},
    group_name="tokenizer",
    description="Byte-level BPE trained on a deterministic sample of the training split, in the Hugging Face layout.",
)
def tokenizer(
    context: dg.AssetExecutionContext,
    pipeline: PipelineResource,
    artifact_store: ArtifactStoreResource,
    dataset_splits: ArtifactHandle,
) -> dg.Output[ArtifactHandle]:
    store = artifact_store.get_store()
    recipe: TokenizerRecipe = pipeline.load().stages.tokenizer

    def build(out: Path) -> dict:
        texts = sample_training_text(store.local_dir(dataset_splits.sha256), recipe.sample_mb)
        if not texts:
            raise dg.Failure("the training split is empty: there is nothing to train a tokenizer on")
        context.log.info(f"training BPE ({recipe.vocab_size} tokens) on {len(texts)} documents")
        trained = train_bpe(texts, recipe, length=len(texts))
        save_hf_tokenizer(trained, recipe, out)
        return {
            "vocab_size": trained.get_vocab_size(),
            "sample_documents": len(texts),
            "sample_mb": round(sum(len(t.encode()) for t in texts) / 1e6, 3),
            "special_tokens": dg.MetadataValue.json({t: trained.token_to_id(t) for t in recipe.special_tokens}),
        }

    return materialize_artifact(
        context, store, kind="hf_tokenizer", config=recipe.fingerprint_config(),
        inputs={"dataset_splits": dataset_splits}, build=build,
    )


@dg.asset_check(
    asset=tokenizer,
    blocking=True,
    description="Loads with AutoTokenizer, has every special token as one id, and round-trips held-out text exactly.",
)
def tokenizer_round_trip(
    context: dg.AssetCheckExecutionContext, pipeline: PipelineResource, artifact_store: ArtifactStoreResource
) -> dg.AssetCheckResult:
    from transformers import AutoTokenizer  # loads with the check, not with the definitions

    store = artifact_store.get_store()
    recipe = pipeline.load().stages.tokenizer
    problems, checked = [], 0
    for handle, mat in artifacts_under_check(context, tokenizer.key, False, store):
        root = store.local_dir(handle.sha256)
        hf = AutoTokenizer.from_pretrained(root)
        for token in recipe.special_tokens:
            ids = hf.convert_tokens_to_ids([token])
            if ids[0] is None or ids[0] == hf.unk_token_id or len(hf.encode(token, add_special_tokens=False)) != 1:
                problems.append(f"special token {token!r} is not a single id")
        splits_sha = consumed_hash(mat, "dataset_splits")  # the held-out text of the split it was trained from
        corrupt, _ = input_problems(store, InputRead("dataset_splits", None, splits_sha, ("val.parquet",)))
        if corrupt:
            problems.extend(describe_input_problem(p) for p in corrupt)
            continue
        val = pl.read_parquet(store.local_dir(splits_sha) / "val.parquet", columns=["id", "sha256", "text"])
        sample = val.sort("sha256").head(recipe.round_trip_docs)
        checked = sample.height
        problems.extend(
            f"{doc_id}: decode(encode(text)) differs from character {at}"
            for doc_id, at in round_trip_failures(
                stored_tokenizer(store, handle), sample["id"].to_list(), sample["text"].to_list()
            )
        )
    return dg.AssetCheckResult(
        passed=not problems,
        severity=dg.AssetCheckSeverity.ERROR,
        description="; ".join(problems[:10]) or f"{checked} held-out documents round-trip exactly",
        metadata={"documents_checked": checked, "failures": len(problems)},
    )


def _pack_frame(
    store: ArtifactStore, tokenizer_handle: ArtifactHandle, recipe: TokenizerRecipe, path: Path, out: Path
) -> dict:
    tok = stored_tokenizer(store, tokenizer_handle)
    texts = pl.read_parquet(path, columns=["text"])["text"].to_list()
    out.mkdir(parents=True, exist_ok=True)
    packed = pack_documents(tok, texts, out, eos_id=tok.token_to_id(recipe.eos_token), batch_size=recipe.encode_batch)
    return {"tokens": packed.tokens, "documents": packed.documents, "dtype": packed.dtype}


@artifact_asset(
    partitions_def=corpus_shards,
    code_version="1",
    kinds={"numpy"},
    group_name="tokenizer",
    description="The training documents of one shard as packed token ids (EOS-separated) with a document index.",
)
def token_shards(
    context: dg.AssetExecutionContext,
    pipeline: PipelineResource,
    artifact_store: ArtifactStoreResource,
    dataset_splits: ArtifactHandle,
    tokenizer: ArtifactHandle,
) -> dg.Output[ArtifactHandle]:
    store = artifact_store.get_store()
    recipe = pipeline.load().stages.tokenizer
    part = train_path(context.partition_key)
    part_sha = part_digest(
        store, dataset_splits, part, "rematerialize dataset_splits after this shard's dedup_corpus"
    )
    return materialize_artifact(
        context, store, kind="packed_tokens",
        config={"train_part": part_sha, "eos_token": recipe.eos_token},
        inputs={"tokenizer": tokenizer}, narrowed_inputs={"dataset_splits": dataset_splits},
        input_files={"dataset_splits": [part]},
        build=lambda out: _pack_frame(store, tokenizer, recipe, store.local_dir(dataset_splits.sha256) / part, out),
    )


@artifact_asset(
    code_version="1",
    kinds={"numpy"},
    group_name="tokenizer",
    description="The held-out val and test splits as packed token ids, for validation loss and perplexity.",
)
def heldout_tokens(
    context: dg.AssetExecutionContext,
    pipeline: PipelineResource,
    artifact_store: ArtifactStoreResource,
    dataset_splits: ArtifactHandle,
    tokenizer: ArtifactHandle,
) -> dg.Output[ArtifactHandle]:
    store = artifact_store.get_store()
    recipe = pipeline.load().stages.tokenizer

    def build(out: Path) -> dict:
        root = store.local_dir(dataset_splits.sha256)
        stats = {name: _pack_frame(store, tokenizer, recipe, root / f"{name}.parquet", out / name) for name in HELD_OUT}
        return {f"{name}_tokens": s["tokens"] for name, s in stats.items()}

    return materialize_artifact(
        context, store, kind="packed_tokens", config={"eos_token": recipe.eos_token},
        inputs={"tokenizer": tokenizer, "dataset_splits": dataset_splits}, build=build,
        input_files={"dataset_splits": [f"{name}.parquet" for name in HELD_OUT]},
    )


def _token_check(asset: dg.AssetsDefinition, partitioned: bool, subdirs: tuple[str, ...]) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=asset,
        name="token_ids_valid",
        blocking=True,
        partitions_def=asset.partitions_def,
        description=(
            "Token and document counts agree, every id is below the vocabulary size, "
            "every document ends with EOS."
        ),
    )
    def token_ids_valid(
        context: dg.AssetCheckExecutionContext, artifact_store: ArtifactStoreResource
    ) -> dg.AssetCheckResult:
        store = artifact_store.get_store()
        problems, tokens = [], 0
        for handle, _ in artifacts_under_check(context, asset.key, partitioned, store):
            root = store.local_dir(handle.sha256)
            for sub in subdirs:
                problems.extend(
                    f"{handle.label}/{sub}: {p}" if sub else f"{handle.label}: {p}"
                    for p in packing_problems(root / sub)
                )
                tokens += int(json.loads((root / sub / META_FILE).read_text())["tokens"])
        return dg.AssetCheckResult(
            passed=not problems,
            severity=dg.AssetCheckSeverity.ERROR,
            description="; ".join(problems) or "counts agree, ids in range, documents EOS-terminated",
            metadata={"tokens": tokens},
        )

    return token_ids_valid


token_shards_valid = _token_check(token_shards, True, ("",))
heldout_tokens_valid = _token_check(heldout_tokens, False, HELD_OUT)


def build_defs(manifest: PipelineManifest) -> dg.Definitions:
    """The same assets for every manifest (the tokenizer's recipe is read at run time), but none
    for one whose sizes all start from a base model: each brings its own tokenizer."""
    if manifest.base_model_sizes and not manifest.pretrained_sizes:
        return dg.Definitions()
    return dg.Definitions(assets=[tokenizer, token_shards, heldout_tokens],
                          asset_checks=[tokenizer_round_trip, token_shards_valid, heldout_tokens_valid])
