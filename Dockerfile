# The llm-assets image: the asset code, its pinned dependencies and the default manifest. One
# image serves as the code server (the CMD below), the run pods and the step pods.
#
# Two variants, chosen by a build argument (docs/deployment.md):
#   docker build .                                 CPU torch (the default)
#   docker build --build-arg TORCH_VARIANT=cuda .  CUDA torch, for the GPU node pools
# PyTorch's CUDA wheels carry their CUDA libraries, so both variants start from the same base: a
# GPU node only needs its NVIDIA driver and device plugin.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DAGSTER_HOME=/opt/dagster/dagster_home
# Nothing in the graph downloads models or data sets: fail fast instead of reaching for the hub.
ENV HF_HUB_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1
# The package is installed into site-packages, where its defaults (paths relative to the source
# tree) point nowhere useful: name the manifest, a local store and the alert log explicitly.
# Deployments set LLM_ASSETS_STORE=s3://... (k8s/helm/values.yaml).
ENV LLM_ASSETS_MANIFEST=/opt/llm-assets/pipeline.yaml \
    LLM_ASSETS_STORE=/opt/dagster/artifacts \
    LLM_ASSETS_ALERTS_JSONL=/opt/dagster/alerts/alerts.jsonl

WORKDIR /opt/llm-assets

# cpu or cuda. The CUDA index names the CUDA version of torch's wheel: pick one that the GPU
# nodes' driver supports (--build-arg TORCH_CUDA_INDEX=...).
ARG TORCH_VARIANT=cpu
ARG TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu130
# The variant's wheel index, written once for both environments below; any other variant stops the build.
RUN case "$TORCH_VARIANT" in \
        cpu) echo https://download.pytorch.org/whl/cpu ;; \
        cuda) echo "$TORCH_CUDA_INDEX" ;; \
        *) echo "TORCH_VARIANT must be cpu or cuda, not '$TORCH_VARIANT'" >&2; exit 1 ;; \
    esac > /opt/torch-index
# The CUDA runtime of the NVIDIA container toolkit: compute (and nvidia-smi) only.
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility

# torch first, pinned, from the variant's index: installed afterwards as a dependency, pip would
# take the default wheel from PyPI, whichever CUDA it was built for. Its own layer, so a code
# change does not re-download it.
RUN pip install --index-url "$(cat /opt/torch-index)" torch==2.13.0

# The quantization environment (llm_assets/quantize): gptqmodel requires protobuf >= 7.34 and
# Dagster protobuf < 7, so quantized_model's worker runs in a venv of its own, with the same torch.
COPY requirements-quantize.txt ./
RUN python -m venv /opt/venv-quant \
    && /opt/venv-quant/bin/pip install --index-url "$(cat /opt/torch-index)" torch==2.13.0 \
    && /opt/venv-quant/bin/pip install -r requirements-quantize.txt
ENV LLM_ASSETS_QUANTIZE_PYTHON=/opt/venv-quant/bin/python

# The commit the image is built from, recorded with every artifact it builds (the image has no
# .git): docker build --build-arg GIT_COMMIT=$(git rev-parse HEAD) .
ARG GIT_COMMIT=unknown
ENV LLM_ASSETS_GIT_COMMIT=$GIT_COMMIT

COPY pyproject.toml README.md pipeline.yaml ./
COPY llm_assets ./llm_assets
COPY resources ./resources
RUN pip install . \
    && /opt/venv-quant/bin/pip install --no-deps . \
    && useradd --create-home --uid 1000 dagster \
    && mkdir -p /opt/dagster/dagster_home /opt/dagster/artifacts /opt/dagster/alerts \
    && chown -R dagster /opt/dagster

USER dagster
EXPOSE 3030

# The gRPC code server that the webserver and daemon load the Definitions from. The Helm chart
# starts the same command with these arguments (dagsterApiGrpcArgs in k8s/helm/values.yaml);
# run and step pods override it with their own `dagster api execute_*` command.
CMD ["dagster", "api", "grpc", "--host", "0.0.0.0", "--port", "3030", "--module-name", "llm_assets.definitions", "--attribute", "defs"]
