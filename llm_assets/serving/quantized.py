"""Which quantized_model artifact serves a release's model under a quantization scheme.

quantized_model[size|scheme] is rematerialized whenever its model changes, and a release may be
moved back to an older model: the artifact to serve is the newest materialization of that
partition made from exactly the released model (its `model_sha256` metadata), not merely the
partition's latest one.
"""

from __future__ import annotations

import dagster as dg

from llm_assets.quantize.assets import SCHEME, SIZE
from resources.handles import META_SHA256

QUANTIZED_MODEL = dg.AssetKey("quantized_model")
MODEL_SHA256 = "model_sha256"  # the metadata entry naming the full-precision model quantized
MATERIALIZATIONS_SEARCHED = 1000  # per partition, newest first: far more than a partition ever holds


class QuantizedModelNotFoundError(LookupError):
    """No quantized_model materialization of the partition was made from the model to serve."""


def quantized_partition(size: str, scheme: str) -> dg.MultiPartitionKey:
    return dg.MultiPartitionKey({SIZE: size, SCHEME: scheme})


def quantized_model_sha256(instance: dg.DagsterInstance, size: str, scheme: str, model_sha256: str) -> str:
    """The artifact hash of quantized_model[size|scheme] made from the model `model_sha256`."""
    partition = quantized_partition(size, scheme)
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=QUANTIZED_MODEL, asset_partitions=[str(partition)]),
        limit=MATERIALIZATIONS_SEARCHED, ascending=False).records
    for record in records:
        metadata = record.asset_materialization.metadata
        if MODEL_SHA256 in metadata and metadata[MODEL_SHA256].value == model_sha256:
            return str(metadata[META_SHA256].value)
    made_from = sorted({str(r.asset_materialization.metadata[MODEL_SHA256].value)[:12] for r in records
                        if MODEL_SHA256 in r.asset_materialization.metadata})
    found = f"its materializations quantize model(s) {', '.join(made_from)}" if made_from else \
        "it was never materialized"
    raise QuantizedModelNotFoundError(
        f"no quantized_model[{partition}] was made from model {model_sha256[:12]} ({found}); materialize it "
        f"(llm-assets materialize --select 'key:quantized_model'), or serve without --scheme")
