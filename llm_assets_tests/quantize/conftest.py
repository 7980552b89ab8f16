"""Fixtures: the evaluation tests' tiny trained model and held-out frame, and the quantization
environment's interpreter (built by `make install`; the tests fail, not skip, without it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_assets.settings import Settings

# Imported fixtures, not copies of them.
from llm_assets_tests.evaluation.conftest import heldout, tokenizer_dir, trained_dir  # noqa: F401


@pytest.fixture(scope="session")
def quantize_python() -> str:
    python = Settings.from_env().quantize_python
    assert Path(python).is_file(), f"no quantization environment at {python}: run `make install`"
    return python
