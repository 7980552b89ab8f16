"""quantized_model: the final model of each size quantized by each scheme (GPTQ 4-bit through
gptqmodel, int8 weight-only through torchao), saved so transformers loads it.

gptqmodel requires protobuf ≥ 7.34 while Dagster requires protobuf < 7, so the quantization runs
in an environment of its own (`make install` builds `.venv-quant`; an image sets
`LLM_ASSETS_QUANTIZE_PYTHON`): the asset (`assets.py`) hands each spec to
`python -m llm_assets.quantize --serve` there, one long-lived worker for every partition.
`worker.py` is what that process runs; it imports neither Dagster nor anything of this package
that does.
"""
