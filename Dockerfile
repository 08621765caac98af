# vldeformer API (and indexer) on a CUDA host. Build: docker build -t vldeformer .
# Installs the project the way the README does on a GPU host: `make install-gpu TORCH_SPEC=...`.
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

ARG TORCH_SPEC="torch==2.5.1"
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    VENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev make curl \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml Makefile README.md ./
COPY model ./model
COPY indexer ./indexer
COPY service ./service
RUN make install-gpu PYTHON=python3.11 VENV=/opt/venv TORCH_SPEC="${TORCH_SPEC}"
# RAY_SPEC: the `ray` extra of pyproject.toml for `--engine ray` (docker compose --profile ray);
# installed on its own because `pip install .[ray]` would bring faiss-cpu back. Empty: no Ray.
ARG RAY_SPEC=""
RUN if [ -n "${RAY_SPEC}" ]; then /opt/venv/bin/pip install "${RAY_SPEC}"; fi

RUN useradd --create-home --uid 10001 vld && mkdir -p /index && chown vld /index
USER 10001

# Model and index locations (mount them); every operator setting (VLD_*) is documented in the README.
ENV VLD_MODEL_DIR=/models/decomposed \
    VLD_INDEX_ROOT=/index \
    VLD_HOST=0.0.0.0 \
    VLD_PORT=8000 \
    VLD_DEVICE=auto
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 \
    CMD ["sh", "-c", "curl -fsS http://127.0.0.1:${VLD_PORT}/readyz || exit 1"]
CMD ["vldeformer-serve"]
