# Two stages: the builder installs the locked dependencies and the project
# into a virtualenv, the runtime stage copies only that virtualenv onto a fresh
# slim base, so no installer, cache, sources or build backend end up in the
# image that runs.
#
#   docker build -t enriched-contacts:local .
#   docker run -p 8000:8000 -e WHATSAPP_API_URL=... -e CRM_API_URL=... enriched-contacts:local
#   docker run enriched-contacts:local python -m simupstream --host 0.0.0.0 --port 8081
#
# No `# syntax=` line: Docker's built-in BuildKit frontend already supports
# `RUN --mount` and `COPY --chmod`, and naming a frontend image would make the
# build fetch it from a registry (it fails offline or behind a mirror).
#
# Both stages must use the same base: the virtualenv's interpreter is a
# symlink to the base image's python3.11.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder

# uv installs exactly what uv.lock records (versions and hashes); it uses the
# base image's Python, never one it downloads, and the system's CA store (as
# pip does), so a TLS-inspecting proxy trusted by the base image works.
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    UV_PROJECT_ENVIRONMENT=/opt/venv \
    UV_PYTHON=python3 \
    UV_PYTHON_DOWNLOADS=never \
    UV_SYSTEM_CERTS=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy

# uv itself, pinned by version and hash, in a venv of its own (a distribution's
# Python refuses a system-wide pip install).
COPY requirements-uv.txt /tmp/
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 -m venv /opt/uv \
    && /opt/uv/bin/pip install --require-hashes -r /tmp/requirements-uv.txt

WORKDIR /src

# Dependencies first, in their own layer, so editing the code does not
# reinstall them. --locked: the build fails if uv.lock does not match
# pyproject.toml, rather than resolving something else.
COPY pyproject.toml uv.lock ./
RUN --mount=type=cache,target=/root/.cache/uv \
    /opt/uv/bin/uv sync --locked --no-dev --no-install-project --no-editable

# Then the project itself (README.md is the package's declared readme),
# installed as a regular package: the runtime stage has no /src.
COPY README.md ./
COPY app ./app
COPY simupstream ./simupstream
RUN --mount=type=cache,target=/root/.cache/uv \
    /opt/uv/bin/uv sync --locked --no-dev --no-editable \
    && /opt/uv/bin/uv pip check --python /opt/venv/bin/python


FROM ${PYTHON_IMAGE} AS runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    WEB_CONCURRENCY=1

RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin app

COPY --from=builder /opt/venv /opt/venv
COPY --chmod=0755 deploy/docker-entrypoint.sh /usr/local/bin/docker-entrypoint
COPY --chmod=0755 deploy/healthcheck.py /usr/local/bin/healthcheck

# The code lives in the virtualenv's site-packages; the working directory is
# only where relative paths (none by default) would land.
WORKDIR /srv
USER 10001:10001

EXPOSE 8000

# One probe for both roles of the image: `healthcheck` reads what PID 1 runs
# and asks the service's /health or the simulator's /healthz on its port
# (deploy/healthcheck.py). No curl in slim images: Python's urllib is there.
# /health is 200 even when Redis is down, by design: the service still answers
# from the CRM.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "/usr/local/bin/healthcheck"]

ENTRYPOINT ["docker-entrypoint"]

# `python -m app` is uvicorn with the service's server bounds (app/server.py:
# request heads above 64 KiB refused, idle and slow clients closed), the same
# configuration as `make run`; it reads WEB_CONCURRENCY and PORT (default 8000)
# itself and is PID 1 (the entrypoint execs it), so it receives SIGTERM and
# shuts down gracefully. Every forwarder is trusted for X-Forwarded-*: only the load
# balancer reaches the container, and it overwrites them with the real client.
CMD ["python", "-m", "app", "--host", "0.0.0.0", "--forwarded-allow-ips", "*"]
