# syntax=docker/dockerfile:1.7
# ghcr.io/rentalml/rentalml-serving — `rentalml serve`: the KServe transformer of the rental-recommender
# InferenceService (in front of Triton), or the standalone KServe model server (v2 REST :8080, gRPC :8081).
# Build from the repository root: docker build -f docker/serving.Dockerfile -t ghcr.io/rentalml/rentalml-serving:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
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
RUN groupadd --gid 10001 rentalml \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/rentalml rentalml
COPY --from=build /opt/venv /opt/venv
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
