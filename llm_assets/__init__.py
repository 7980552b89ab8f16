"""llm-assets: the lifecycle of a language model as one Dagster asset graph."""

import warnings

# Two Dagster features we rely on are marked beta/preview; dagster is pinned exactly in
# pyproject.toml, so their warnings carry no news here. Matched by message, not by Dagster's
# warning classes: the package must import without Dagster (the quantization worker's
# environment has none, see llm_assets/quantize).
warnings.filterwarnings("ignore", message=r"Parameter `data_version`")
warnings.filterwarnings("ignore", message=r"Specifying a partitions_def on an AssetCheckSpec")
warnings.filterwarnings("ignore", message=r"Function `PipesMessageReader.expected_writer_count`")
