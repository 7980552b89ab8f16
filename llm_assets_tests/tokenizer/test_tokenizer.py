"""Byte-level BPE and packed token shards, without Dagster and on a real instance."""

from __future__ import annotations

import hashlib
import json
import random

import dagster as dg
import numpy as np
import polars as pl
import pytest
from tokenizers import normalizers
from transformers import AutoTokenizer

from llm_assets.manifest import TokenizerRecipe
from llm_assets.runner import materialize_graph
from llm_assets.store import open_store
from llm_assets.tokenizer.bpe import round_trip_failures, save_hf_tokenizer, train_bpe
from llm_assets.tokenizer.packing import (
    INDEX_FILE,
    META_FILE,
    TOKENS_FILE,
    pack_documents,
    packing_problems,
    read_packed,
)

RECIPE = TokenizerRecipe(vocab_size=400, min_frequency=2)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    rng = random.Random(3)
    words = ["def", "return", "self", "value", "import", "class", "Ünïcödé", "naïve", "日本語", "🙂", "\t", "\n"]
    return [" ".join(rng.choice(words) for _ in range(rng.randrange(20, 80))) for _ in range(300)]


def test_training_is_deterministic_and_saves_the_hf_layout(texts, tmp_path):
    first, second = train_bpe(texts, RECIPE), train_bpe(texts, RECIPE)
    assert hashlib.sha256(first.to_str().encode()).digest() == hashlib.sha256(second.to_str().encode()).digest()
    save_hf_tokenizer(first, RECIPE, tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert hf.eos_token == "<|endoftext|>" and hf.pad_token == "<|pad|>"
    assert hf.convert_tokens_to_ids("<|endoftext|>") == first.token_to_id("<|endoftext|>")
    assert hf.decode(hf.encode(texts[0], add_special_tokens=False)) == texts[0]


def test_round_trip_is_exact_and_a_lossy_tokenizer_is_caught(texts):
    lossless = train_bpe(texts, RECIPE)
    held_out = ["naïve 日本語 🙂 new words never seen\r\n\x00 in training", *texts[:20]]
    ids = [f"d{i}" for i in range(len(held_out))]
    assert list(round_trip_failures(lossless, ids, held_out)) == []
    lossy = train_bpe(texts, RECIPE)
    lossy.normalizer = normalizers.Lowercase()
    failures = list(round_trip_failures(lossy, ["upper"], ["Class Value"]))
    assert failures == [("upper", 0)]


def test_packing_round_trips_and_problems_are_found(texts, tmp_path):
    tok = train_bpe(texts, RECIPE)
    eos = tok.token_to_id(RECIPE.eos_token)
    packed = pack_documents(tok, texts[:50], tmp_path, eos_id=eos, batch_size=7)
    tokens, offsets, meta = read_packed(tmp_path)
    assert meta.documents == 50 and meta.tokens == len(tokens) == offsets[-1] and tokens.dtype == np.uint16
    for i in (0, 17, 49):
        doc = tokens[offsets[i]:offsets[i + 1]]
        assert doc[-1] == eos and tok.decode(doc[:-1].tolist()) == texts[i]
    assert packing_problems(tmp_path) == [] and packed.vocab_size == tok.get_vocab_size()

    data = bytearray((tmp_path / TOKENS_FILE).read_bytes())
    data[0:2] = np.uint16(60000).tobytes()
    (tmp_path / TOKENS_FILE).write_bytes(bytes(data))
    assert any("token id 60000 is not below" in p for p in packing_problems(tmp_path))
    np.save(tmp_path / INDEX_FILE, offsets[:-1] + 1, allow_pickle=False)
    problems = packing_problems(tmp_path)
    assert any("do not end with EOS" in p for p in problems) and any("index ends at" in p for p in problems)


def test_token_shards_hold_exactly_the_training_text(defs, instance, settings):
    assert materialize_graph(defs, instance, log=lambda _: None).success
    store = open_store(settings.store_uri)
    shard = instance.get_dynamic_partitions("corpus_shards")[0]

    def root_of(asset: str, partition: str | None = None):
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition] if partition else None),
            limit=1,
        ).records
        return store.local_dir(records[0].asset_materialization.metadata["sha256"].value)

    hf = AutoTokenizer.from_pretrained(root_of("tokenizer"))
    train = pl.read_parquet(next((root_of("dataset_splits") / "train").glob(f"{shard}*.parquet")))["text"].to_list()
    tokens, offsets, meta = read_packed(root_of("token_shards", shard))
    assert meta.documents == len(train)
    decoded = [hf.decode(tokens[offsets[i]:offsets[i + 1] - 1].tolist()) for i in range(len(train))]
    assert decoded == train
    held = json.loads((root_of("heldout_tokens") / "val" / META_FILE).read_text())
    assert held["documents"] > 0
