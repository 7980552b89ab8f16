"""quantized_model: the final model of each size quantized by each scheme (GPTQ 4-bit through
gptqmodel, int8 weight-only through torchao), saved so transformers loads it.

gptqmodel requires protobuf ≥ 7.34 while Dagster requires protobuf < 7, so the quantization runs
in an environment of its own (`make install` builds `.venv-quant`; an image sets
`LLM_ASSETS_QUANTIZE_PYTHON`): the asset (`assets.py`) starts `python -m llm_assets.quantize`
there through Dagster Pipes. `worker.py` is that process; it imports neither Dagster nor
anything of this package that does.
"""
