# slimserve: CPU image by default. GPU (CUDA 12.8 wheels bundle their CUDA libraries; the host
# needs the NVIDIA driver and container toolkit):
#   docker build --build-arg TORCH=torch==2.13.0 --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t slimserve:cuda .
#   docker run --gpus 1 -e SLIMSERVE_DEVICE=cuda -p 8000:8000 slimserve:cuda
# The install runs the same Makefile recipe as `make install` (see README), so CI exercises it.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH=torch==2.13.0+cpu
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends make && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md Makefile ./
COPY models ./models
COPY searcher ./searcher
COPY server ./server
COPY loadtest ./loadtest
COPY slimserve ./slimserve
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN make install-runtime VENV=/opt/venv TORCH="${TORCH}" TORCH_INDEX="${TORCH_INDEX}"

FROM ${PYTHON_IMAGE} AS runtime
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin slimserve
COPY --from=build /opt/venv /opt/venv
# Inside a container the port must be reachable from outside it; the demo bundle is baked in.
# Mount another at /bundle and set SLIMSERVE_BUNDLE=/bundle to serve your own.
ENV PATH=/opt/venv/bin:$PATH \
    SLIMSERVE_HOST=0.0.0.0 \
    SLIMSERVE_PORT=8000 \
    OMP_WAIT_POLICY=PASSIVE \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /home/slimserve
EXPOSE 8000
# Liveness only: readiness (/readyz) belongs to the orchestrator, which must not restart a
# container that is still warming up or draining.
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/livez', timeout=2)"]
STOPSIGNAL SIGTERM
# Exec form: slimserve is PID 1 and receives SIGTERM itself, so it drains in-flight requests.
CMD ["slimserve", "serve"]
