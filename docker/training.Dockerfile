# syntax=docker/dockerfile:1.7
# ghcr.io/rentalml/rentalml — the training image: KFP pipeline steps, TrainJob (torchrun) and MPIJob (mpirun)
# workers, Katib trials, the weekly `rentalml pipeline submit`, the MLflow server and the Feast feature server.
# Build from the repository root: docker build -f docker/training.Dockerfile -t ghcr.io/rentalml/rentalml:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, the CPU wheel pinned (the project's range would otherwise pull a multi-GB CUDA build);
# a GPU image swaps this index for the CUDA one
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
WORKDIR /src
COPY pyproject.toml README.md ./
COPY rentalml rentalml
COPY components components
COPY pipelines pipelines
COPY inference inference
COPY streaming streaming
RUN pip install --no-cache-dir .

FROM ${PYTHON_IMAGE}
# OpenMPI and ssh for the MPIJob launcher/workers (the operator mounts the ssh keys); postgresql-client for
# `rentalml backup` / `restore` of PostgreSQL (pg_dump, pg_restore)
RUN apt-get update \
    && apt-get install -y --no-install-recommends openmpi-bin openssh-client openssh-server postgresql-client \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 rentalml \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/rentalml rentalml
COPY --from=build /opt/venv /opt/venv
COPY feature_repo /app/feature_repo
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    RENTALML_HOME=/tmp/rentalml RENTALML_FEAST__REPO_PATH=/app/feature_repo
WORKDIR /app
# numeric, so Kubernetes can verify runAsNonRoot
USER 10001:10001
ENTRYPOINT ["rentalml"]
CMD ["--help"]
