"""The local stack a load-test run measures, all on 127.0.0.1.

An S3 store (a child process: moto, the default, or SeaweedFS with
``origin="seaweedfs"``) ← the counting :class:`S3Proxy` (in this process) ← 3
``cachesvc peer`` + 2 ``cachesvc agent`` child processes, and nginx (the
caching baseline) ← also in front of the proxy. Every origin GET of every
target passes the one proxy, so origin GETs and bytes are counted the same way
for cachesvc and both baselines.

moto is a mock (any credentials, objects in memory); SeaweedFS is a store
(signatures checked, objects on disk), with anonymous reads allowed so the
origin-direct and nginx baselines can GET without signing, as from moto.

Caches live in a temporary directory removed at the end; logs go to the run's
``logs/`` directory.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import boto3

from loadtest.nginx import start_nginx
from loadtest.origin_proxy import S3Proxy
from loadtest.procs import Child, free_port, spawn, venv_tool, wait_ready
from loadtest.seaweedfs import SeaweedFS

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
BUCKET = "loadtest-pkgs"
CACHE_SIZE = "20GiB"
Extra = Callable[[str, str], Sequence[str]]  # (role, url) → more flags for that process
ORIGINS = ("moto", "seaweedfs")  # the S3 stores a run can put behind the proxy


@dataclass(frozen=True)
class Target:
    """What the load generator points at: base URLs and the package path template."""

    name: str
    hosts: tuple[str, ...]
    path_template: str


@dataclass
class LocalStack:
    store_url: str  # the S3 store itself (seeding goes here, uncounted)
    proxy: S3Proxy
    agents: list[str]
    peers: list[str]
    nginx_url: str | None  # None: the run leaves the nginx baseline out
    token: str
    children: list[Child] = field(default_factory=list)
    caches: Path | None = None  # each process's store is <caches>/<role>-<index>
    origin_kind: str = "moto"  # one of ORIGINS

    @property
    def moto_url(self) -> str:
        """The store's URL under its name from before ``origin_kind`` existed."""
        return self.store_url

    @property
    def origin_url(self) -> str:
        return f"s3://{BUCKET}"

    def targets(self) -> dict[str, Target]:
        blob = f"/{BUCKET}/blobs/sha256/{{hex}}"
        targets = {
            "origin": Target("origin", (self.proxy.url,), blob),
            "cachesvc": Target("cachesvc", tuple(self.agents), "/pkg/sha256:{hex}"),
        }
        if self.nginx_url is not None:
            targets["nginx"] = Target("nginx", (self.nginx_url,), blob)
        return targets


async def start_moto(logs: Path) -> tuple[Child, str]:
    port = free_port()
    argv = [venv_tool("moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    child = await spawn("moto", argv, logs / "moto.log", env=AWS_ENV)
    url = f"http://127.0.0.1:{port}"
    await wait_ready(child, url + "/")
    await asyncio.to_thread(boto3.client("s3", endpoint_url=url).create_bucket, Bucket=BUCKET)
    return child, url


async def start_store(kind: str, stack: AsyncExitStack, caches: Path, logs: Path) -> str:
    """Start the S3 store ``kind`` with the bucket; its stop goes on ``stack``."""
    if kind == "moto":
        moto, url = await start_moto(logs)
        stack.push_async_callback(moto.stop)
        return url
    store = SeaweedFS(caches / "seaweedfs", anonymous_read=True, log_file=logs / "seaweedfs.log")
    stack.push_async_callback(asyncio.to_thread, store.stop, False)  # its data goes with caches
    await asyncio.to_thread(store.start)
    s3 = boto3.client("s3", endpoint_url=store.endpoint)
    await asyncio.to_thread(s3.create_bucket, Bucket=BUCKET)
    return store.endpoint


async def start_tier(
    role: str,
    index: int,
    ring: list[str],
    proxy_url: str,
    caches: Path,
    logs: Path,
    token: str,
    extra: Extra | None = None,
) -> Child:
    """One ``cachesvc peer`` or ``cachesvc agent`` on the port its URL names;
    ``extra(role, url)`` gives more flags (``python -m loadtest fanout``)."""
    url = ring[index] if role == "peer" else f"http://127.0.0.1:{free_port()}"
    argv = [venv_tool("cachesvc"), role, "--listen", url.removeprefix("http://")]
    argv += ["--cache-dir", str(caches / f"{role}-{index}"), "--cache-size", CACHE_SIZE]
    argv += ["--origin", f"s3://{BUCKET}", "--s3-endpoint", proxy_url, "--peers", ",".join(ring)]
    argv += ["--shutdown-grace", "2", "--log-level", "WARNING"]
    argv += ["--advertise", url] if role == "peer" else []
    argv += extra(role, url) if extra is not None else []
    env = {**AWS_ENV, "CACHESVC_TOKEN": token}
    child = await spawn(f"{role}-{index}", argv, logs / f"{role}-{index}.log", env=env)
    await wait_ready(child, url + "/readyz")
    child.name = url  # the base URL is what callers want back
    return child


@asynccontextmanager
async def local_stack(
    logs: Path,
    peers: int = 3,
    agents: int = 2,
    nginx: bool = True,
    extra: Extra | None = None,
    origin: str = "moto",
) -> AsyncIterator[LocalStack]:
    """Start everything (nginx only if ``nginx``), yield it, stop everything
    (also on errors). ``extra`` adds flags per process (see :func:`start_tier`);
    ``origin`` is the S3 store behind the proxy, one of :data:`ORIGINS`."""
    logs.mkdir(parents=True, exist_ok=True)
    for name, value in AWS_ENV.items():  # this process seeds moto too
        os.environ.setdefault(name, value)
    caches = Path(tempfile.mkdtemp(prefix="cachesvc-loadtest-"))
    token = secrets.token_hex(16)
    async with AsyncExitStack() as stack:
        stack.callback(shutil.rmtree, caches, True)
        store_url = await start_store(origin, stack, caches, logs)
        proxy = await S3Proxy(store_url).start()
        stack.push_async_callback(proxy.stop)
        ring = [f"http://127.0.0.1:{free_port()}" for _ in range(peers)]
        which = [("peer", i) for i in range(peers)] + [("agent", i) for i in range(agents)]
        tiers = await _start_all(stack, which, ring, proxy, caches, logs, token, extra)
        nginx_url = None
        if nginx:
            nginx_child, nginx_url = await start_nginx(caches / "nginx", proxy.url)
            stack.push_async_callback(nginx_child.stop)
        agent_urls = [c.name for c in tiers[peers:]]
        yield LocalStack(
            store_url, proxy, agent_urls, ring, nginx_url, token, tiers, caches, origin
        )


async def _start_all(
    stack: AsyncExitStack,
    which: list[tuple[str, int]],
    ring: list[str],
    proxy: S3Proxy,
    caches: Path,
    logs: Path,
    token: str,
    extra: Extra | None = None,
) -> list[Child]:
    results = await asyncio.gather(
        *(start_tier(role, i, ring, proxy.url, caches, logs, token, extra) for role, i in which),
        return_exceptions=True,
    )
    children = [r for r in results if isinstance(r, Child)]
    for child in children:
        stack.push_async_callback(child.stop)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return children
