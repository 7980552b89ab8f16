"""Partition definitions of the data stages."""

import dagster as dg

corpus_shards = dg.DynamicPartitionsDefinition(name="corpus_shards")
