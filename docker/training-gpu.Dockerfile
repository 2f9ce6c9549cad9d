# syntax=docker/dockerfile:1.7
# ghcr.io/rentalml/rentalml-gpu — the training image with CUDA torch, for the prod overlay's GPU TrainJob / MPIJob
# workers and Katib trials (manifests/jobs/prod). Everything but torch's index is training.Dockerfile's.
# torch 2.13.0's CUDA wheels bundle the CUDA runtime, cuDNN and NCCL (pip packages), so the base stays the plain
# Python image and the node needs only the NVIDIA driver (>= 580 for CUDA 13.0; pass
# --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 for older drivers). Several GB: built by
# `make images GPU=1`, never by `make test`.
# Build from the repository root: docker build -f docker/training-gpu.Dockerfile -t ghcr.io/rentalml/rentalml-gpu:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# the project's own wheel, and its dependency list read from pyproject.toml (a file of its own, so that the
# runtime stage's dependency layers change only when the dependencies do, not with every source or README edit)
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
        > /requirements.txt
COPY rentalml rentalml
COPY components components
COPY pipelines pipelines
COPY inference inference
COPY streaming streaming
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

# the runtime: training.Dockerfile's, with CUDA torch
FROM ${PYTHON_IMAGE}
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN groupadd --gid 10001 rentalml \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/rentalml rentalml \
    && python -m venv /opt/venv
# torch first, pinned, from the CUDA index: 2.13.0+cu130 (CUDA 13.0, also the build of PyPI's plain torch 2.13.0,
# which docker/build.sh uses where download.pytorch.org is unreachable)
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
ARG TORCH_FIND_LINKS=
RUN /opt/venv/bin/pip install --no-cache-dir torch==2.13.0 --index-url ${TORCH_INDEX_URL} \
    ${TORCH_FIND_LINKS:+--find-links ${TORCH_FIND_LINKS}}
COPY --from=build /requirements.txt /opt/venv/requirements.txt
RUN /opt/venv/bin/pip install --no-cache-dir -r /opt/venv/requirements.txt
# OpenMPI and ssh for the MPIJob launcher/workers (the operator mounts the ssh keys); postgresql-client for
# `rentalml backup` / `restore` of PostgreSQL (pg_dump, pg_restore)
RUN apt-get update \
    && apt-get install -y --no-install-recommends openmpi-bin openssh-client openssh-server postgresql-client \
    && rm -rf /var/lib/apt/lists/*
# the project itself, last: a source change rebuilds only this (COPY's cache follows the wheel's content)
COPY --from=build /dist /tmp/dist
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps /tmp/dist/*.whl && rm -rf /tmp/dist
COPY feature_repo /app/feature_repo
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    RENTALML_HOME=/tmp/rentalml RENTALML_FEAST__REPO_PATH=/app/feature_repo
WORKDIR /app
# numeric, so Kubernetes can verify runAsNonRoot
USER 10001:10001
ENTRYPOINT ["rentalml"]
CMD ["--help"]
