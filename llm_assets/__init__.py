"""llm-assets: the lifecycle of a language model as one Dagster asset graph."""

import logging
import sys
import warnings

# Two Dagster features we rely on are marked beta/preview; dagster is pinned exactly in
# pyproject.toml, so their warnings carry no news here. Matched by message, not by Dagster's
# warning classes: the package must import without Dagster (the quantization worker's
# environment has none, see llm_assets/quantize).
warnings.filterwarnings("ignore", message=r"Parameter `data_version`")
warnings.filterwarnings("ignore", message=r"Specifying a partitions_def on an AssetCheckSpec")
warnings.filterwarnings("ignore", message=r"Function `PipesMessageReader.expected_writer_count`")


class _KnownLibraryNoise(logging.Filter):
    """Drops two warnings that every command would print and no user can act on: torchao's CUDA
    kernels (`_C_*.so`) do not load into a CPU build of torch (the default install; with a CUDA
    build the warning stays), and torchao registers enums with torch's pytree in a way torch now
    calls deprecated. Any other record of those loggers passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        torch = sys.modules.get("torch")  # torchao imports it before it loads its kernels
        cpu_build = torch is not None and torch.version.cuda is None
        cuda_kernel = cpu_build and message.startswith("Failed to load ") and "/torchao/_C" in message
        return not (cuda_kernel or "is an Enum subclass and is now natively supported" in message)


for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).addFilter(_KnownLibraryNoise())
