# syntax=docker/dockerfile:1.7
# cachesvc image: `cachesvc agent ...` (node agent, L1) or `cachesvc peer ...`
# (L2 peer). Build from the repository root, tagged with the version in
# pyproject.toml (the tag the compose file and deploy/k8s use):
#   docker build -t cachesvc:0.1.0 .

# --- build: install the package and its dependencies into a venv -------------
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
# Only what `pip install .` needs (see .dockerignore): a change to tests or
# deploy/ does not invalidate this layer.
COPY pyproject.toml README.md ./
COPY cachesvc ./cachesvc
COPY node_agent ./node_agent
COPY loadtest ./loadtest
RUN /opt/venv/bin/pip install .

# --- runtime: the venv, a non-root user, no compilers ------------------------
FROM python:3.11-slim
LABEL org.opencontainers.image.title="cachesvc" \
      org.opencontainers.image.version="0.1.0"
ARG UID=10001
# The cache and code directories exist and belong to the service user so that
# fresh Docker volumes mounted there inherit the ownership. (Kubernetes
# hostPath directories are prepared by the DaemonSet's init container.)
RUN groupadd --system --gid "${UID}" cachesvc \
 && useradd --system --uid "${UID}" --gid cachesvc --no-create-home \
        --home-dir /var/lib/cachesvc --shell /usr/sbin/nologin cachesvc \
 && mkdir -p /var/cache/cachesvc /var/lib/cachesvc/code \
 && chown -R cachesvc:cachesvc /var/cache/cachesvc /var/lib/cachesvc
COPY --from=build /opt/venv /opt/venv

# Liveness for plain Docker and compose (Kubernetes uses its own probes).
# slim has no curl; Python's urllib is enough. It checks the port of
# CACHESVC_LISTEN when that is set, otherwise the default agent (8700) and
# peer (8701) ports; an answer other than 2xx/3xx counts as unhealthy.
COPY --chmod=0755 <<'PY' /usr/local/bin/cachesvc-healthcheck
#!/opt/venv/bin/python
import os
import sys
import urllib.request

listen = os.environ.get("CACHESVC_LISTEN", "")
host, _, port = listen.rpartition(":")
host = host.strip("[]")
if not host or host in ("0.0.0.0", "::"):
    host = "127.0.0.1"
targets = [(host, port)] if port else [("127.0.0.1", "8700"), ("127.0.0.1", "8701")]
for h, p in targets:
    try:
        urllib.request.urlopen(f"http://{h}:{p}/healthz", timeout=3).close()
        sys.exit(0)
    except OSError:
        continue
sys.exit(1)
PY

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER ${UID}:${UID}
WORKDIR /var/lib/cachesvc
EXPOSE 8700 8701
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["cachesvc-healthcheck"]
ENTRYPOINT ["cachesvc"]
CMD ["--help"]
