"""The data half of the graph: ingestion, cleaning, near-duplicate removal and splits."""

from llm_assets.data.clean_corpus import clean_corpus, kept_fraction_in_bounds, residual_pii
from llm_assets.data.dataset_splits import contamination_gate, dataset_splits, no_duplicates_across_splits
from llm_assets.data.dedup_corpus import dedup_clusters, dedup_corpus, minhash_signatures
from llm_assets.data.inventory import corpus_inventory
from llm_assets.data.raw_corpus import raw_corpus, raw_schema_and_content
from llm_assets.data.sensors import corpus_landing_sensor

assets = [raw_corpus, corpus_inventory, clean_corpus, minhash_signatures, dedup_clusters, dedup_corpus, dataset_splits]
checks = [
    raw_schema_and_content, residual_pii, kept_fraction_in_bounds, contamination_gate, no_duplicates_across_splits,
]
sensors = [corpus_landing_sensor]
