#!/bin/sh
# Container entrypoint: prepare the Prometheus multiprocess directory, then
# exec the command (uvicorn by default, or `python -m simupstream ...`), so the
# command runs as PID 1 and receives the container's stop signal directly.
set -eu

# With several uvicorn workers, each worker is its own process with its own
# counters: prometheus-client's multiprocess mode has them write to a shared
# directory that /metrics aggregates. Turn it on by itself when there is more
# than one worker and nobody chose a directory.
workers="${WEB_CONCURRENCY:-1}"
case "$workers" in
    '' | *[!0-9]*) workers=1 ;;
esac
if [ "$workers" -gt 1 ] && [ -z "${PROMETHEUS_MULTIPROC_DIR:-}" ]; then
    PROMETHEUS_MULTIPROC_DIR=/tmp/prometheus-multiproc
    export PROMETHEUS_MULTIPROC_DIR
fi

# The directory must exist before the workers import prometheus-client, and
# must not hold the files of a previous run (a restarted container would
# otherwise report the dead processes' samples forever). Only the client's own
# *.db files are removed, never anything else that may live there.
if [ -n "${PROMETHEUS_MULTIPROC_DIR:-}" ]; then
    mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
    find "$PROMETHEUS_MULTIPROC_DIR" -maxdepth 1 -type f -name '*.db' -delete
fi

exec "$@"
