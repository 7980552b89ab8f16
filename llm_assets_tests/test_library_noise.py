"""Importing the project prints no warning a user cannot act on, and hides nothing else."""

import logging
import subprocess
import sys

import torch

from llm_assets import _KnownLibraryNoise


def record(name: str, message: str) -> logging.LogRecord:
    return logging.LogRecord(name, logging.WARNING, __file__, 1, message, None, None)


def test_only_the_known_library_warnings_are_dropped() -> None:
    noise = _KnownLibraryNoise()
    kernel = record("torchao", "Failed to load /venv/site-packages/torchao/_C_mxfp8.so: Could not load this library")
    assert noise.filter(kernel) is (torch.version.cuda is not None)  # kept where CUDA could load it
    assert not noise.filter(record("torch.utils._pytree", "<enum 'KernelPreference'> is an Enum subclass and is "
                                                          "now natively supported by torch.compile"))
    assert noise.filter(record("torchao", "Skipping import of cpp extensions due to incompatible torch version"))


def test_loading_the_definitions_prints_no_library_warning() -> None:
    loaded = subprocess.run([sys.executable, "-c", "import llm_assets.definitions"], capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert "torchao" not in loaded.stderr and "Enum subclass" not in loaded.stderr, loaded.stderr[-2000:]
