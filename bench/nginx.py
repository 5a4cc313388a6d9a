"""A contacts upstream that costs (almost) no CPU: nginx serving pre-rendered pages.

The simulator renders every page in Python on the machine under test, so in a
warm comparison it competes for the CPU with the targets, and a design that
makes the upstream work harder (or gets slower pages) looks better or worse
for it. nginx serves each profile's page as a static file instead, as a remote
API would cost nothing here:

- `/<profile>/contacts` and `/<profile>-<anything>/contacts` answer the
  profile's file (a cold run asks for a new instance per request, and every
  one of them gets the same page);
- every other path goes to the simulator (other scenarios' pages, with their
  latency and failure settings), over kept-alive connections.

One process (`daemon off; master_process off;`) in its own process group like
every child, no access log, keep-alive without a request limit.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
from pathlib import Path

from bench.procs import LOOPBACK, Child, Children, free_port
from bench.profiles import PROFILES

READY_TIMEOUT = 15.0


def write_pages(root: Path) -> dict[str, int]:
    """Each profile's page as `<root>/pages/<name>.json`; their sizes in bytes."""
    pages = root / "pages"
    pages.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, int] = {}
    for name, profile in PROFILES.items():
        body = profile.page()
        (pages / f"{name}.json").write_bytes(body)
        sizes[name] = len(body)
    return sizes


def config(root: Path, port: int, sim_port: int) -> str:
    names = "|".join(re.escape(n) for n in PROFILES)
    # As root, nginx would hand its worker to `nobody`, who cannot write here.
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else ""
    return f"""
{user}
daemon off;
master_process off;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {root}/client_body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    sendfile on;
    tcp_nopush on;
    open_file_cache max=64 inactive=3600s;
    keepalive_requests 1000000000;
    keepalive_timeout 3600s;

    upstream sim {{
        server {LOOPBACK}:{sim_port};
        keepalive 64;
    }}
    server {{
        listen {LOOPBACK}:{port};
        root {root}/pages;
        location ~ ^/({names})(-[a-z0-9_-]*)?/contacts$ {{
            default_type application/json;
            try_files /$1.json =404;
        }}
        location / {{
            proxy_pass http://sim;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 120s;
        }}
    }}
}}
"""


def start_nginx(children: Children, root: Path, sim_port: int) -> Child:
    """nginx on a free loopback port, serving `write_pages(root)` and proxying to the sim."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        raise RuntimeError("nginx is not installed (scripts/ensure-system-deps.sh bench)")
    write_pages(root)
    port = free_port()
    conf = root / "nginx.conf"
    conf.write_text(config(root, port, sim_port))
    args = [binary, "-p", str(root), "-e", str(root / "error.log"), "-c", str(conf)]
    child = children.spawn("nginx", args, port=port)
    first = next(iter(PROFILES))
    child.wait_http(f"/{first}/contacts", READY_TIMEOUT)
    return child
