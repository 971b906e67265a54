"""Signed blob reads on a custom endpoint (cachesvc/upstream/s3reads.py): against moto
and SeaweedFS they run in the read-path tests; here against real servers that
misbehave in ways those stores do not."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from cachesvc.digest import Digest
from cachesvc.errors import NotFound, UpstreamError
from cachesvc.upstream.origin import S3Origin, blob_key
from tests.servers import digest_of, free_port, start_server

DATA = os.urandom(300_000)
DIGEST = digest_of(DATA)


class FakeS3:
    """Answers GETs of one blob; ``fail_first`` 503s, ``ignore_range`` sends the
    whole body to a ranged GET; every request's headers are kept."""

    def __init__(self, fail_first: int = 0, ignore_range: bool = False) -> None:
        self.fail_first = fail_first
        self.ignore_range = ignore_range
        self.seen: list[dict[str, str]] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(dict(request.headers))
        if self.fail_first > 0:
            self.fail_first -= 1
            return web.Response(status=503, text="<Error><Code>SlowDown</Code></Error>")
        if not request.path.endswith(blob_key(DIGEST)):
            body = "<Error><Code>NoSuchKey</Code><Message>gone</Message></Error>"
            return web.Response(status=404, text=body, content_type="application/xml")
        start = int(request.headers.get("Range", "bytes=0-")[6:].split("-")[0] or 0)
        if start and not self.ignore_range:
            headers = {"Content-Range": f"bytes {start}-{len(DATA) - 1}/{len(DATA)}"}
            return web.Response(status=206, body=DATA[start:], headers=headers)
        return web.Response(body=DATA)


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeS3, S3Origin]]:
    s3 = FakeS3()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", s3.handle)
    runner, url = await start_server(app, free_port())
    origin = S3Origin("bucket", "prefix", url, timeout=5.0)
    await origin.start()
    yield s3, origin
    await origin.close()
    await runner.cleanup()


async def read(origin: S3Origin, digest: Digest, offset: int = 0) -> tuple[int, bytes]:
    async with origin.open(digest, offset) as body:
        return body.size, b"".join([c async for c in body.chunks])


async def test_a_signed_get_reads_the_blob_path_style(fake: tuple[FakeS3, S3Origin]) -> None:
    s3, origin = fake
    assert await read(origin, DIGEST) == (len(DATA), DATA)
    assert await read(origin, DIGEST, 1000) == (len(DATA), DATA[1000:])
    assert await origin.head(DIGEST) == len(DATA)
    assert all(h["Authorization"].startswith("AWS4-HMAC-SHA256 Credential=") for h in s3.seen)
    assert all("X-Amz-Content-SHA256" in h or "x-amz-content-sha256" in h for h in s3.seen)


async def test_a_5xx_before_the_body_is_tried_twice_more(fake: tuple[FakeS3, S3Origin]) -> None:
    s3, origin = fake
    s3.fail_first = 2
    assert await read(origin, DIGEST) == (len(DATA), DATA)
    s3.fail_first = 3
    with pytest.raises(UpstreamError, match="SlowDown"):
        await read(origin, DIGEST)


async def test_a_store_that_ignores_the_range_is_an_error_not_wrong_bytes(
    fake: tuple[FakeS3, S3Origin],
) -> None:
    s3, origin = fake
    s3.ignore_range = True
    with pytest.raises(UpstreamError, match="asked from byte 1000"):
        await read(origin, DIGEST, 1000)


async def test_no_such_key_is_not_found(fake: tuple[FakeS3, S3Origin]) -> None:
    _, origin = fake
    with pytest.raises(NotFound):
        await read(origin, digest_of(b"other"))
    with pytest.raises(NotFound):
        await origin.head(digest_of(b"other"))
