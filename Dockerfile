# syntax=docker/dockerfile:1
# The project image: CUDA runtime + the pipeline with the vLLM backend, running a Prefect
# process worker for the `scf` work pool (docker/worker-entrypoint.sh). Built by
# docker-compose.yml (`worker` service); also the image for a docker/kubernetes GPU pool
# (see prefect.yaml, definitions.work_pools).
#
#   docker build -t scf-pipeline:latest .
#   docker run --gpus all -e PREFECT_API_URL=http://<server>:4200/api scf-pipeline:latest

# The torch in the base image is the one the vllm extra resolves to (vllm 0.19 pins torch
# 2.10), so pip keeps the image's CUDA build instead of downloading another.
ARG BASE_IMAGE=pytorch/pytorch:2.10.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

# Everything the pipeline writes lives under /data (a volume in docker-compose.yml): run
# workdirs (merged models, DuckDB), toy zoo and evaluation caches, Prefect task results (the
# content-addressed cache that lets a rerun skip finished merges).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SCF_CACHE=/data/cache \
    PREFECT_HOME=/data/prefect \
    MLFLOW_DISABLE_TELEMETRY=1 \
    DO_NOT_TRACK=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    TOKENIZERS_PARALLELISM=false

WORKDIR /opt/scf-pipeline

# The code first, then one install: the project is installed editable so that the flow
# files a deployment points at (flows/*.py) and the imported packages are the same copy.
COPY pyproject.toml README.md ./
COPY scf/ scf/
COPY evals/ evals/
COPY tasks/ tasks/
COPY flows/ flows/
RUN python -m pip install -e ".[vllm,evals]"

# Run configs, deployments and the worker script change more often than dependencies.
COPY configs/ configs/
COPY prefect.yaml ./
COPY docker/worker-entrypoint.sh /usr/local/bin/scf-worker
# Configs default their workdir (merged models, DuckDB, plots) to ./.scf: keep it on the volume.
RUN chmod 0755 /usr/local/bin/scf-worker && mkdir -p /data/scf && ln -s /data/scf .scf

# The worker's healthcheck server (`prefect worker start --with-healthcheck`).
ENV PREFECT_WORKER_WEBSERVER_HOST=0.0.0.0 \
    PREFECT_WORKER_WEBSERVER_PORT=8080
EXPOSE 8080

# A CMD, not an ENTRYPOINT: `docker compose run --rm worker prefect deploy --all` and
# `docker compose exec worker scf ...` run other commands in the same image.
CMD ["scf-worker"]
