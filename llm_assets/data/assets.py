"""The data half's Definitions: ingestion, cleaning, near-duplicate removal and splits."""

import dagster as dg

from llm_assets.data.clean_corpus import clean_corpus, kept_fraction_in_bounds, language_kept_fraction, residual_pii
from llm_assets.data.dataset_splits import contamination_gate, dataset_splits, no_duplicates_across_splits
from llm_assets.data.dedup_corpus import dedup_clusters, dedup_corpus, minhash_signatures
from llm_assets.data.inventory import corpus_inventory
from llm_assets.data.raw_corpus import raw_corpus, raw_schema_and_content
from llm_assets.data.sensors import corpus_landing_sensor
from llm_assets.manifest import PipelineManifest


def build_defs(manifest: PipelineManifest) -> dg.Definitions:
    """The same assets for every manifest: sources become partitions, not assets (the landing
    sensor adds them), so the data half is defined once."""
    return dg.Definitions(
        assets=[raw_corpus, corpus_inventory, clean_corpus, minhash_signatures, dedup_clusters, dedup_corpus,
                dataset_splits],
        asset_checks=[raw_schema_and_content, residual_pii, kept_fraction_in_bounds, language_kept_fraction,
                      contamination_gate, no_duplicates_across_splits],
        sensors=[corpus_landing_sensor],
    )
