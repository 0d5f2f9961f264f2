# pagedserve container image: `pagedserve serve` on port 8000, CPU torch by default.
#
#   docker build -t pagedserve:cpu .
#   docker run --rm -p 8000:8000 pagedserve:cpu                          # the bundled stories260k
#   docker run --rm -p 8000:8000 -v /srv/models/qwen:/models/qwen:ro pagedserve:cpu /models/qwen --host 0.0.0.0
#
# CUDA image from the same file: torch's CUDA wheels bring their own CUDA runtime (the nvidia-*
# wheels), so a plain Debian base is enough; the host needs the NVIDIA driver and the NVIDIA
# Container Toolkit (`docker run --gpus all ...`, or the `gpu` profile of deploy/docker-compose.yml):
#
#   docker build -t pagedserve:cuda --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#   (or --build-arg TORCH_INDEX_URL= to take PyPI's torch, which is a CUDA build on Linux x86_64)
#
# Offline builds: when the build context holds a `.wheelhouse/` directory with *.whl files (see
# deploy/test_compose.sh, which fills it on the host), every Python package, the build backend
# included, is installed from it with `--no-index --find-links` and the build needs no network.
# Without it, packages come from PyPI (and torch from TORCH_INDEX_URL).
#
# Works with the classic builder and BuildKit alike (no RUN --mount, no heredocs, no syntax line).

ARG BASE_IMAGE=debian:bookworm-slim

# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS base

ENV LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# A base that already has python3 with venv and g++ (the workplace's debootstrap image) skips
# apt; a stock debian:bookworm(-slim) gets them here. Python must be 3.11 to match a cp311
# wheelhouse. g++ builds the compiled CPU kernels (kernels/csrc) when the server first needs
# them, for the CPU it runs on; without it the server runs the slower torch path.
RUN if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || ! command -v c++ >/dev/null; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            python3 python3-venv ca-certificates g++ \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 --version && c++ --version | head -1

# ---------------------------------------------------------------------------------------------
# The dependencies, in a venv that only pyproject.toml and the wheelhouse change: editing the
# source neither reinstalls torch nor makes a new 1 GB layer in the final image.
FROM base AS deps

ARG TORCH_VERSION=2.13.0
# What to ask pip for: e.g. "torch==2.13.0+cpu", or a CUDA build's version.
ARG TORCH_SPEC="torch==${TORCH_VERSION}"
# Index that torch comes from when there is no wheelhouse; empty means PyPI.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_CONFIG_FILE=/etc/pagedserve-build-pip.conf

# pyproject.toml always matches, so the optional .wheelhouse may be absent. Its wheels land in
# /wheelhouse next to a copy of pyproject.toml (the dependency list, read below).
COPY pyproject.toml .wheelhouse* /wheelhouse/

RUN set -eu; \
    if ls /wheelhouse/*.whl >/dev/null 2>&1; then \
        echo "pip: offline, from the build context's .wheelhouse ($(ls /wheelhouse/*.whl | wc -l) wheels)"; \
        printf '[global]\nno-index = true\nfind-links = /wheelhouse\n' > "$PIP_CONFIG_FILE"; \
        pip install "$TORCH_SPEC"; \
    else \
        echo "pip: online (no .wheelhouse in the build context)"; \
        : > "$PIP_CONFIG_FILE"; \
        if [ -n "$TORCH_INDEX_URL" ]; then \
            pip install --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"; \
        else \
            pip install "$TORCH_SPEC"; \
        fi; \
    fi; \
    python -c "import tomllib; deps = tomllib.load(open('/wheelhouse/pyproject.toml', 'rb'))['project']['dependencies']; open('/tmp/requirements.txt', 'w').write(chr(10).join(deps) + chr(10))"; \
    pip install -r /tmp/requirements.txt "$TORCH_SPEC"

# ---------------------------------------------------------------------------------------------
# The package itself as a wheel (setuptools comes from the wheelhouse or PyPI as well).
FROM deps AS wheel
COPY pyproject.toml README.md /src/
COPY server /src/server
COPY kernels /src/kernels
RUN pip wheel --no-deps --wheel-dir /dist /src

# ---------------------------------------------------------------------------------------------
FROM base

LABEL org.opencontainers.image.title="pagedserve" \
      org.opencontainers.image.description="OpenAI-compatible LLM inference server with a paged KV cache" \
      org.opencontainers.image.licenses="MIT"

RUN useradd --create-home --home-dir /home/pagedserve --uid 10001 --user-group \
        --shell /usr/sbin/nologin pagedserve \
    && mkdir -p /models

# HF_HUB_OFFLINE: models are only ever read from local directories (mount them, e.g. at /models).
ENV PATH=/opt/venv/bin:$PATH \
    HF_HUB_OFFLINE=1

COPY --from=deps /opt/venv /opt/venv
COPY --from=wheel /dist /tmp/dist
# A regular, non-editable install (the bundled model is package data).
RUN pip install --no-index --no-deps /tmp/dist/*.whl \
    && rm -rf /tmp/dist \
    && python -c "import torch, server; print('torch', torch.__version__, '| pagedserve', server.__file__)" \
    && pagedserve --help >/dev/null

ENV HOME=/home/pagedserve
USER pagedserve
WORKDIR /home/pagedserve

EXPOSE 8000

# /health answers 200 once the model is loaded (503 while loading or after a failed load).
# Assumes the default port 8000 inside the container.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

# No model argument: the bundled stories260k. Give a model directory as the first argument of
# `docker run IMAGE /models/NAME --host 0.0.0.0` (CMD is replaced, so repeat --host 0.0.0.0).
ENTRYPOINT ["pagedserve", "serve"]
CMD ["--host", "0.0.0.0", "--port", "8000"]
