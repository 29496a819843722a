# InferQL on CPU: the project, the CPU build of torch, and the default model converted
# at build time, so the container starts without fetching anything.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    INFERQL_CACHE_DIR=/opt/inferql/cache \
    INFERQL_DATABASE_URL=sqlite:////var/lib/inferql/inferql.db

WORKDIR /src
COPY pyproject.toml README.md ./
COPY app ./app
# torch is pinned to 2.13.0 in pyproject.toml. For a small CPU-only image, build with
# --build-arg PIP_EXTRA_INDEX_URL=<PyTorch's CPU wheel index>: pip then prefers the
# 2.13.0+cpu build over the default, much larger, CUDA-dependent wheel.
ARG PIP_EXTRA_INDEX_URL
RUN pip install . \
 && rm -rf /src

RUN useradd --create-home --uid 10001 inferql \
 && mkdir -p /opt/inferql/cache /var/lib/inferql \
 && chown -R inferql:inferql /opt/inferql /var/lib/inferql \
 && chmod 0700 /var/lib/inferql

USER inferql
WORKDIR /home/inferql

# Fetch and convert the default model once, into the image.
RUN inferql model pull

# Production mode: no GraphiQL, no introspection, no field suggestions. Everything the
# server keeps (the SQLite database, the webhook secret, the first admin key's file)
# lives in the volume below, so a new container keeps it; the process runs as a
# non-root user that owns only that volume and the model cache.
ENV INFERQL_HOST=0.0.0.0 \
    INFERQL_PORT=8000 \
    INFERQL_ENV=production \
    INFERQL_DATA_DIR=/var/lib/inferql \
    HF_HUB_OFFLINE=1

EXPOSE 8000
VOLUME ["/var/lib/inferql"]

HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('INFERQL_PORT', '8000'), timeout=4)" || exit 1

CMD ["inferql", "serve"]
