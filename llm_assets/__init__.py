"""llm-assets: the lifecycle of a language model as one Dagster asset graph."""
