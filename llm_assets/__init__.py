"""llm-assets: the lifecycle of a language model as one Dagster asset graph."""

import warnings

import dagster as dg

# Two Dagster features we rely on are marked beta/preview; dagster is pinned exactly in
# pyproject.toml, so their warnings carry no news here.
warnings.filterwarnings("ignore", message=r"Parameter `data_version`", category=dg.BetaWarning)
warnings.filterwarnings("ignore", message=r"Specifying a partitions_def on an AssetCheckSpec", category=dg.PreviewWarning)
warnings.filterwarnings("ignore", message=r"Function `PipesMessageReader.expected_writer_count`", category=dg.PreviewWarning)
