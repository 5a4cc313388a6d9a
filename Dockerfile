# syntax=docker/dockerfile:1
#
# Two stages: the builder resolves and installs everything into a virtualenv,
# the runtime stage copies only that virtualenv onto a fresh slim base, so no
# pip cache, sources or build backend end up in the image that runs.
#
#   docker build -t enriched-contacts:local .
#   docker run -p 8000:8000 -e WHATSAPP_API_URL=... -e CRM_API_URL=... enriched-contacts:local
#   docker run enriched-contacts:local python -m simupstream --host 0.0.0.0 --port 8081
#
# Both stages must use the same base: the virtualenv's interpreter is a
# symlink to the base image's /usr/local/bin/python3.11.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv "$VIRTUAL_ENV"

WORKDIR /src

# Dependencies first, in their own layer, so editing the code does not
# reinstall them: the list is read from pyproject.toml itself, which stays the
# one place that names them.
COPY pyproject.toml ./
RUN --mount=type=cache,target=/root/.cache/pip \
    python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

# Then the project itself (README.md is the package's declared readme).
COPY README.md ./
COPY app ./app
COPY simupstream ./simupstream
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install . \
    && pip check

# uvicorn's logging config, dumped from the code that defines it: with
# --workers N the supervisor process never imports the app, and without this
# it would log its lines (start, a worker died, stop) as plain text.
RUN mkdir -p /opt/venv/share/enriched-contacts \
    && python -c "import json, sys, app.logging as l; json.dump(l.UVICORN_LOG_CONFIG, sys.stdout)" \
        > /opt/venv/share/enriched-contacts/uvicorn-logging.json


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

# The code lives in the virtualenv's site-packages; the working directory is
# only where relative paths (none by default) would land.
WORKDIR /srv
USER 10001:10001

EXPOSE 8000

# No curl in slim images: Python's urllib is already there. urlopen raises on
# anything but 2xx, so the exit code is the health. /health is 200 even when
# Redis is down, by design: the service still answers from the CRM.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"]

ENTRYPOINT ["docker-entrypoint"]

# `sh -c` so that WEB_CONCURRENCY expands at run time, and `exec` so that
# uvicorn replaces the shell as PID 1 and receives SIGTERM itself (graceful
# shutdown: in-flight requests finish, Redis and HTTP clients close).
# --proxy-headers with every forwarder trusted: only the load balancer can reach
# the container, and it overwrites X-Forwarded-For with the real client address.
# --no-access-log: the app writes its own structured line per request;
# --log-config: uvicorn's own lines (the supervisor's too) in the same format.
CMD ["sh", "-c", "exec uvicorn app.main:app --host 0.0.0.0 --port 8000 --workers \"${WEB_CONCURRENCY:-1}\" --proxy-headers --forwarded-allow-ips='*' --loop uvloop --http httptools --no-access-log --log-config /opt/venv/share/enriched-contacts/uvicorn-logging.json"]
