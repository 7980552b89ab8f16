"""The data half of the graph: ingestion and corpus profiling."""

from llm_assets.data.inventory import corpus_inventory
from llm_assets.data.raw_corpus import raw_corpus
from llm_assets.data.sensors import corpus_landing_sensor

assets = [raw_corpus, corpus_inventory]
sensors = [corpus_landing_sensor]
