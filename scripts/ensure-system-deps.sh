#!/usr/bin/env bash
# Installs the servers the tests (and the benchmark) run for real, when they are missing:
# redis-server and redis-cli, nginx (also the benchmark's upstream of static contacts pages),
# Prometheus (with promtool) and redis_exporter; and for `bench`, wrk and Node.js/npm.
set -euo pipefail

need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v redis-cli >/dev/null || need+=(redis-tools)
[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null || need+=(nginx-light)
{ command -v prometheus >/dev/null && command -v promtool >/dev/null; } || need+=(prometheus)
command -v prometheus-redis-exporter >/dev/null || need+=(prometheus-redis-exporter)
if [ "${1:-}" = "bench" ]; then
  command -v wrk >/dev/null || need+=(wrk)
  command -v node >/dev/null || need+=(nodejs)
  command -v npm >/dev/null || need+=(npm)
fi
[ ${#need[@]} -eq 0 ] && exit 0

echo "installing: ${need[*]}"
if [ "$(id -u)" -eq 0 ]; then sudo=""; elif command -v sudo >/dev/null; then sudo="sudo"; else
  echo "missing ${need[*]}: install them with your package manager" >&2; exit 1
fi
if ! command -v apt-get >/dev/null; then
  echo "missing ${need[*]}: no apt-get here, install them with your package manager" >&2; exit 1
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# Debian starts the packaged services; the tests start their own on free ports.
for svc in redis-server nginx prometheus prometheus-redis-exporter; do
  $sudo systemctl disable --now "$svc" >/dev/null 2>&1 || $sudo service "$svc" stop >/dev/null 2>&1 || true
done
