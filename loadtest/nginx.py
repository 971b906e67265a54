"""nginx as the caching-proxy baseline, in the foreground with its own prefix.

One worker process (``worker_processes 1``): the machine has two cores that
the load generator, the origin and the proxy share, and each cachesvc agent is
one process too. ``proxy_cache_lock on`` makes concurrent misses for one URL
wait for a single upstream fill (the lock timeout and age are raised to 120 s
so a slow 50 MB fill is not duplicated after the 5 s default). It caches 200s
for a day, keyed by URI, and reports HIT/MISS in ``X-Cache-Status``.

Where nginx is not on PATH and cannot be installed (not root, no apt-get),
:func:`nginx_binary` says so with :class:`~loadtest.tools.ToolUnavailable`, and
the load test runs without this baseline.
"""

from __future__ import annotations

import os
import pwd
import signal
from pathlib import Path

from loadtest.procs import Child, free_port, spawn, wait_ready
from loadtest.tools import require

CONF = """\
{user}worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    proxy_cache_path {prefix}/cache levels=1:2 keys_zone=pkgs:16m max_size=20g
                     inactive=1d use_temp_path=off;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass {upstream};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache pkgs;
            proxy_cache_key $uri;
            proxy_cache_valid 200 1d;
            proxy_cache_lock on;
            proxy_cache_lock_timeout 120s;
            proxy_cache_lock_age 120s;
            add_header X-Cache-Status $upstream_cache_status;
        }}
    }}
}}
"""


def nginx_binary() -> str:
    """The nginx on PATH, installing the Debian package first when it is missing
    and we may. Raises :class:`~loadtest.tools.ToolUnavailable` saying why not
    (not root, no apt-get, apt-get failed): callers leave the baseline out."""
    return require({"nginx": "nginx"})["nginx"]


def write_conf(prefix: Path, port: int, upstream: str) -> Path:
    for sub in ("cache", "tmp"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    # As root, workers would drop to "nobody", who cannot write our cache dir.
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name};\n" if os.geteuid() == 0 else ""
    conf = prefix / "nginx.conf"
    conf.write_text(CONF.format(user=user, prefix=prefix, port=port, upstream=upstream))
    return conf


async def start_nginx(prefix: Path, upstream: str) -> tuple[Child, str]:
    """Start nginx caching ``upstream`` on a free loopback port; returns it and its URL."""
    prefix = prefix.resolve()
    port = free_port()
    conf = write_conf(prefix, port, upstream)
    argv = [nginx_binary(), "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    child = await spawn("nginx", argv, prefix / "stdout.log")
    child.stop_signal = signal.SIGQUIT  # graceful: finish in-flight responses
    url = f"http://127.0.0.1:{port}"
    await wait_ready(child, url + "/", ok=(200, 403, 404))
    return child, url
