# syntax=docker/dockerfile:1
# The relay (and the bundled fake, mockrealtime) as a small non-root image.
#   docker build -t relay .
#   docker run --rm -p 127.0.0.1:8000:8000 -e OPENAI_API_KEY -e RELAY_API_KEYS relay
# compose.yaml runs it in front of the fake with Redis as the usage store.

# --- build: resolve the locked dependencies and install the project into /app/.venv ---
FROM python:3.11-slim-bookworm AS build
COPY --from=ghcr.io/astral-sh/uv:0.13.9 /uv /uvx /bin/
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=0 \
    UV_PROJECT_ENVIRONMENT=/app/.venv
WORKDIR /src
# Dependencies first: this layer is reused until pyproject.toml or uv.lock change.
RUN --mount=type=cache,target=/root/.cache/uv \
    --mount=type=bind,source=uv.lock,target=uv.lock \
    --mount=type=bind,source=pyproject.toml,target=pyproject.toml \
    uv sync --frozen --no-dev --no-install-project
COPY pyproject.toml uv.lock README.md ./
COPY src ./src
# Not editable: the venv holds a real install, so the runtime stage needs no source tree.
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable

# --- runtime: the venv on a clean slim Python, run as an unprivileged user ---
FROM python:3.11-slim-bookworm
RUN groupadd --system --gid 10001 relay \
    && useradd --system --uid 10001 --gid relay --home-dir /data --no-create-home \
       --shell /usr/sbin/nologin relay \
    && mkdir /data && chown relay:relay /data
COPY --from=build /app/.venv /app/.venv
# The relay's state directory is /data (its default store: /data/relay/usage.db). Mount a
# volume on /data to keep usage across restarts, or set RELAY_STORE=redis://... for many replicas.
ENV PATH=/app/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    XDG_STATE_HOME=/data
WORKDIR /data
USER relay
EXPOSE 8000
# No curl in slim images: Python's urllib asks /healthz; any error or non-2xx status fails.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('RELAY_PORT', '8000'), timeout=3)"]
# On SIGTERM the relay drains (readyz 503, a notice, RELAY_DRAIN_SECONDS, then 1012) and exits 0.
STOPSIGNAL SIGTERM
CMD ["relay", "serve", "--host", "0.0.0.0"]
