"""A real object store in the loop: SeaweedFS (checks SigV4 signatures, keeps its
data across a restart) under real ``cachesvc`` processes and in-process stacks.

What "a clear error" means here, for a wrong secret: the text names what was
being done (the command, or the service's request and the object's
``s3://`` URL), gives the store's own error code (``SignatureDoesNotMatch``)
and says what to check (the credentials, by their variables' names); on an
agent it also names the peer that answered and quotes the peer's reason. The
tests below assert each of those parts.
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path
from typing import Any

import aiohttp
import boto3
import botocore.exceptions
import pytest
from aiohttp import web

from cachesvc.digest import Digest
from cachesvc.serve.readiness import ORIGIN_TTL, OriginCheck
from cachesvc.serve.service import READINESS
from cachesvc.upstream.origin import S3Origin
from loadtest.seaweedfs import ADMIN, Identity, SeaweedFS
from tests.clock import Clock
from tests.conftest import SEAWEED_BUCKET, OriginFixture
from tests.http import fetch, get_json
from tests.servers import Stack, eventually, free_port, start_server

pytestmark = pytest.mark.slow  # real cachesvc processes and SeaweedFS

WRONG = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
REFUSED = "origin refused: SignatureDoesNotMatch: The request signature we calculated"
HINT = "check the origin credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY"


def real_zip(size: int) -> bytes:
    """A real deployment zip: some source, and a stored random blob for bulk."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("handler.py", "def handler(event, context):\n    return 'ok'\n")
        zf.writestr("vendor/blob.bin", os.urandom(size), compress_type=zipfile.ZIP_STORED)
    return buf.getvalue()


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "cachesvc", *args]
    env = {**os.environ, **(env or {})}
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)


class Service:
    """``cachesvc agent|peer`` as a child process, its log in a file."""

    def __init__(self, role: str, root: Path, origin: OriginFixture, peers: str = "") -> None:
        self.role, self.root, self.origin, self.peers = role, root, origin, peers
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / f"{role}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self, env: dict[str, str] | None = None) -> Service:
        """Start it; returns once it answers ``/healthz`` (ready or not)."""
        self.root.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "cachesvc", self.role,
                "--listen", f"127.0.0.1:{self.port}", "--cache-dir", str(self.root / "cache"),
                "--cache-size", "1GiB", "--origin", self.origin.url,
                "--s3-endpoint", str(self.origin.endpoint), "--peers", self.peers or self.url,
                "--shutdown-grace", "1", "--origin-timeout", "10"]  # fmt: skip
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=log, env={**os.environ, **(env or {})}
            )

        async def healthy() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
            try:
                return (await get_json(f"{self.url}/healthz"))[0] == 200
            except aiohttp.ClientError:
                return False

        await eventually(healthy, f"{self.role} answering /healthz", step=0.05)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def forget(self) -> None:
        """Stop it and throw its cache away: the next start is cold."""
        self.stop()
        shutil.rmtree(self.root / "cache")


async def readyz_settled(base: str) -> tuple[int, dict[str, Any]]:
    """/readyz once the first origin check has ended (a probe waits for it only
    a second, less than a loaded machine may need); bounded to 30 s."""

    async def settled() -> tuple[int, dict[str, Any]] | None:
        status, body = await get_json(f"{base}/readyz")
        return (
            None if body.get("reason", "").endswith("first check still running") else (status, body)
        )

    return await eventually(settled, f"{base}: the first origin check ended", step=0.1)


async def readable(seaweedfs: SeaweedFS, key: str) -> None:
    """Wait until the store serves ``key`` again, read directly (not counted
    as an origin GET): after a crash, the volume server re-registers with
    the master a moment after the S3 API answers ("try again" until then),
    longer on a loaded machine."""
    s3 = boto3.client("s3", endpoint_url=seaweedfs.endpoint)

    def read() -> bool:
        try:
            s3.get_object(Bucket=SEAWEED_BUCKET, Key=key)["Body"].read()
            return True
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError):
            return False

    await eventually(lambda: asyncio.to_thread(read), f"{key} readable again", step=0.2)


def publish(origin: OriginFixture, package: Path, env: dict[str, str] | None = None) -> Any:
    """``cachesvc publish`` straight to SeaweedFS (not through the counting proxy)."""
    return cli("publish", str(package), "--tenant", "acme", "--function", "resize",
               "--version", "7", "--origin", origin.url, "--s3-endpoint",
               str(origin.direct_endpoint), env=env)  # fmt: skip


async def test_publish_cold_fetch_through_agent_and_peer_and_a_store_restart_keep_the_package(
    seaweedfs: SeaweedFS, seaweed_origin: OriginFixture, tmp_path: Path
) -> None:
    data = real_zip(3 << 20)
    package = tmp_path / "app.zip"
    package.write_bytes(data)
    out = publish(seaweed_origin, package)
    assert out.returncode == 0, out.stderr
    digest = Digest.parse(out.stdout.strip())
    peer = Service("peer", tmp_path / "peer", seaweed_origin)
    agent = Service("agent", tmp_path / "agent", seaweed_origin, peers=peer.url)
    try:
        await peer.start()
        await agent.start()
        assert await fetch(f"{agent.url}/pkg/{digest}") == (200, "L2", data)
        assert seaweed_origin.origin_gets(digest) == 1
        assert await fetch(f"{agent.url}/pkg/{digest}") == (200, "L1", data)

        seaweedfs.restart(graceful=False)  # a crash: harsher than a clean restart
        blob = seaweed_origin.url.split("/", 3)[3] + f"/blobs/sha256/{digest.hex}"
        await readable(seaweedfs, blob)  # the S3 API answers before its volume is back
        peer.forget()
        agent.forget()
        await peer.start()
        await agent.start()
        assert await fetch(f"{agent.url}/pkg/{digest}") == (200, "L2", data)
        assert seaweed_origin.origin_gets(digest) == 2  # it came from the restarted store
    finally:
        agent.stop()
        peer.stop()
    key = seaweed_origin.url.split("/", 3)[3] + "/tenants/acme/resize/7.json"
    s3 = boto3.client("s3", endpoint_url=seaweedfs.endpoint)
    assert str(digest) in s3.get_object(Bucket=SEAWEED_BUCKET, Key=key)["Body"].read().decode()


async def test_a_wrong_secret_is_a_clear_error_from_publish_the_agent_and_the_peer(
    seaweed_origin: OriginFixture, tmp_path: Path
) -> None:
    package = tmp_path / "app.zip"
    package.write_bytes(real_zip(1 << 16))
    digest = Digest.parse(publish(seaweed_origin, package).stdout.strip())
    blob_url = f"{seaweed_origin.url}/blobs/sha256/{digest.hex}"

    refused = publish(seaweed_origin, package, env=WRONG)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.startswith(f"cachesvc: publish {package}: HEAD {blob_url}: {REFUSED}")
    assert HINT in refused.stderr and len(refused.stderr.splitlines()) == 1

    peer = Service("peer", tmp_path / "peer", seaweed_origin)
    agent = Service("agent", tmp_path / "agent", seaweed_origin, peers=peer.url)
    try:
        await peer.start(env=WRONG)
        await agent.start(env=WRONG)
        for service in (peer, agent):
            status, body = await readyz_settled(service.url)
            assert (status, body["status"]) == (503, "not_ready"), body
            assert body["reason"].startswith(f"origin {seaweed_origin.url}: SignatureDoesNotMatch")
        status, body = await get_json(f"{agent.url}/pkg/{digest}")
        assert (status, body["error"]) == (502, "upstream_error")
        assert body["detail"].startswith(f"GET {blob_url}: {REFUSED}") and HINT in body["detail"]
    finally:
        agent.stop()
        peer.stop()
    agent_log, peer_log = agent.log.read_text(), peer.log.read_text()
    said = f"GET {peer.url}/blob/{digest.short}: answered 502 upstream_error: GET {blob_url}: "
    assert f"via {peer.url} failed: {said}{REFUSED}" in agent_log  # the peer's reason, quoted
    assert f"{blob_url}: {REFUSED}" in peer_log
    assert f"readiness: origin {seaweed_origin.url}: SignatureDoesNotMatch" in peer_log


async def test_readyz_says_why_the_origin_refuses_the_secret_and_is_ready_once_it_is_fixed(
    seaweedfs: SeaweedFS, seaweed_origin: OriginFixture, tmp_path: Path, monkeypatch: Any
) -> None:
    key = f"ops-{uuid.uuid4().hex[:8]}"
    seaweedfs.set_identities([ADMIN, Identity("ops", key, "old-secret")])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "new-secret")
    stack = Stack(seaweed_origin.url, seaweed_origin.endpoint, tmp_path / "stack")
    try:
        [peer] = await stack.start_peers(1)
        check = stack.apps[peer][READINESS].origin
        clock = Clock(0.0)
        check.clock, check.wait = clock, 30.0
        status, body = await get_json(f"{peer}/readyz")
        assert (status, body["status"]) == (503, "not_ready")
        assert body["reason"].startswith(f"origin {seaweed_origin.url}: SignatureDoesNotMatch: ")
        assert HINT in body["reason"]

        seaweedfs.set_identities([ADMIN, Identity("ops", key, "new-secret")])  # fixed at the store
        assert (await get_json(f"{peer}/readyz"))[0] == 503  # the verdict is cached...
        assert check.checks == 1  # ...and the origin was not asked again
        clock.now += ORIGIN_TTL
        status, body = await get_json(f"{peer}/readyz")
        assert (status, body["status"], body["origin"]) == (200, "ready", "ok")
        assert check.checks == 2
    finally:
        await stack.close()


async def test_readyz_stays_ready_when_the_origin_does_not_answer_and_says_so(
    tmp_path: Path,
) -> None:
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    stack = Stack("s3://nowhere", closed, tmp_path / "stack")
    try:
        [peer] = await stack.start_peers(1)
        stack.apps[peer][READINESS].origin.wait = 30.0
        status, body = await get_json(f"{peer}/readyz")
    finally:
        await stack.close()
    assert (status, body["status"]) == (200, "ready")
    assert body["origin"].startswith("unreachable: origin s3://nowhere: EndpointConnectionError")


async def test_a_probe_never_waits_longer_than_its_bound_on_a_hanging_origin() -> None:
    async def hang(request: web.Request) -> web.Response:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    app = web.Application()
    app.router.add_route("*", "/{path:.*}", hang)
    runner, hanging = await start_server(app)  # an S3 endpoint that never answers
    origin = S3Origin("bucket", "", hanging, timeout=3600)
    check = OriginCheck(origin, wait=0.05)
    try:
        assert await check.current() is None  # no verdict yet: the check is still running
        assert check.checks == 0
    finally:
        await check.close()
        await origin.close()
        await runner.cleanup()
