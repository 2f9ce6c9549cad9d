# syntax=docker/dockerfile:1.7
# ghcr.io/rentalml/rentalml-serving — `rentalml serve`: the KServe transformer of the rental-recommender
# InferenceService (in front of Triton), or the standalone KServe model server (v2 REST :8080, gRPC :8081).
# Build from the repository root: docker build -f docker/serving.Dockerfile -t ghcr.io/rentalml/rentalml-serving:0.1.0 .
# Without a registry: `make images` (docker/build.sh, podman).
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

# the runtime: identical up to the dependencies in all three images (layers built and stored once)
FROM ${PYTHON_IMAGE}
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN groupadd --gid 10001 rentalml \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/rentalml rentalml \
    && python -m venv /opt/venv
# torch first, the CPU wheel pinned (the project's range would otherwise pull a multi-GB CUDA build). Its index is
# an ARG: training-gpu.Dockerfile sets the CUDA one; a machine that cannot reach download.pytorch.org passes the
# same 2.13.0+cpu wheel from a directory mounted into the build (docker/build.sh: TORCH_INDEX_URL=PyPI for its
# dependencies, TORCH_FIND_LINKS=/opt/wheels)
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_FIND_LINKS=
RUN /opt/venv/bin/pip install --no-cache-dir torch==2.13.0 --index-url ${TORCH_INDEX_URL} \
    ${TORCH_FIND_LINKS:+--find-links ${TORCH_FIND_LINKS}}
COPY --from=build /requirements.txt /opt/venv/requirements.txt
RUN /opt/venv/bin/pip install --no-cache-dir -r /opt/venv/requirements.txt
# the project itself, last: a source change rebuilds only this (COPY's cache follows the wheel's content)
COPY --from=build /dist /tmp/dist
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps /tmp/dist/*.whl && rm -rf /tmp/dist
COPY feature_repo /app/feature_repo
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    RENTALML_HOME=/tmp/rentalml RENTALML_FEAST__REPO_PATH=/app/feature_repo
WORKDIR /app
EXPOSE 8080 8081
USER 10001:10001
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/v2/health/ready', timeout=2)"]
ENTRYPOINT ["rentalml"]
CMD ["serve", "--role", "transformer"]
