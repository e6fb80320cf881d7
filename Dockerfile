# syntax=docker/dockerfile:1
# Two images from one file (docker-compose.yml builds both):
#   publisher  slim Python, no torch: publish, runyard status / leaderboard / dashboard / doctor
#   worker     PyTorch with CUDA: `worker --gpus all`, one RQ worker process per GPU
# Record the commit the images are built from, so every run says which code trained it:
#   GIT_SHA=$(git rev-parse HEAD) docker compose build
ARG PYTHON_IMAGE=python:3.11-slim
ARG PYTORCH_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

FROM ${PYTHON_IMAGE} AS publisher
ARG GIT_SHA=
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RUNYARD_GIT_SHA=${GIT_SHA} RUNYARD_HOME=/runyard
WORKDIR /opt/runyard
COPY . .
RUN pip install ".[dashboard]" \
    && useradd --create-home --uid 1000 runyard \
    && mkdir -p /runyard && chown runyard /runyard
USER runyard
CMD ["runyard", "--help"]

FROM ${PYTORCH_IMAGE} AS worker
ARG GIT_SHA=
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RUNYARD_GIT_SHA=${GIT_SHA} RUNYARD_HOME=/runyard
WORKDIR /opt/runyard
COPY . .
# The image's torch (CUDA build) satisfies runyard's torch requirement, so pip keeps it.
# nvidia-ml-py lets `worker --gpus all` and `runyard doctor` count GPUs without touching CUDA.
RUN pip install ".[train]" nvidia-ml-py && mkdir -p /runyard/runs
CMD ["worker", "--gpus", "all"]
