"""Tokenization throughput of token_shards' packing vs raw `tokenizers.encode_batch` on the same text.

Trains a byte-level BPE on a sample of the Python standard library, then encodes the whole
library (one document per module) twice in this process: (a) `Tokenizer.encode_batch` alone, the
peer; (b) `pack_documents`, which also appends EOS and writes tokens.bin and the index.
Usage: python bench/tokenize_throughput.py [--vocab 4096]
"""

from __future__ import annotations

import argparse
import os
import sys
import sysconfig
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._util import report, timed  # noqa: E402
from llm_assets.manifest import TokenizerRecipe  # noqa: E402
from llm_assets.tokenizer.bpe import train_bpe  # noqa: E402
from llm_assets.tokenizer.packing import pack_documents  # noqa: E402


def stdlib_texts() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in {"site-packages", "test", "tests", "__pycache__"})
        for name in sorted(filenames):
            if name.endswith(".py"):
                texts.append((Path(dirpath) / name).read_text(encoding="utf-8", errors="replace"))
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--vocab", type=int, default=4096)
    args = parser.parse_args()
    recipe = TokenizerRecipe(vocab_size=args.vocab)
    texts = stdlib_texts()
    megabytes = sum(len(t.encode()) for t in texts) / 1e6
    tokenizer = train_bpe(texts[::8], recipe)
    eos = tokenizer.token_to_id(recipe.eos_token)
    raw_s, encodings = timed(lambda: tokenizer.encode_batch(texts, add_special_tokens=False))
    with tempfile.TemporaryDirectory() as tmp:
        pack_s, packed = timed(
            lambda: pack_documents(tokenizer, texts, Path(tmp), eos_id=eos, batch_size=recipe.encode_batch)
        )
    assert packed.tokens == sum(len(e.ids) for e in encodings) + len(texts)
    report(f"tokenization of {len(texts)} stdlib modules ({megabytes:.1f} MB, vocab {args.vocab})", [
        ("raw encode_batch", f"{megabytes / raw_s:6.2f} MB/s  {packed.tokens / raw_s:10.0f} tokens/s"),
        ("token_shards packing", f"{megabytes / pack_s:6.2f} MB/s  {packed.tokens / pack_s:10.0f} tokens/s"),
        ("time ratio packing/raw", f"{pack_s / raw_s:.2f}x"),
    ])


if __name__ == "__main__":
    main()
