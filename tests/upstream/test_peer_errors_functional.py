"""When a peer answers with an error, the agent says why: the peer's own
``{"error", "detail"}`` travels in the :class:`PeerFailed` text into the agent's
log, bounded and on one line. Real peers (cachesvc, or a real server that
answers badly) on loopback."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from aiohttp import web

from cachesvc.errors import PeerFailed
from cachesvc.upstream.peer_client import REASON_MAX, PeerClient
from tests.conftest import OriginFixture
from tests.http import get
from tests.servers import S3Proxy, Stack, digest_of, payload, start_fake_peer, start_server


async def failure_of(peer: str, data: bytes) -> str:
    client = PeerClient()
    try:
        with pytest.raises(PeerFailed) as failed:
            async with client.open(peer, digest_of(data)):
                pass
    finally:
        await client.close()
    return str(failed.value)


async def answering(status: int, body: bytes) -> tuple[web.AppRunner, str]:
    async def blob(request: web.Request) -> web.Response:
        return web.Response(status=status, body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/blob/{digest}", blob)
    return await start_server(app)


async def test_a_peer_error_is_quoted_bounded_and_on_one_line() -> None:
    data = payload(1000, seed=70)
    detail = "origin said:\nline two\x1b[31m " + "x" * 10_000
    runner, peer = await answering(
        502, json.dumps({"error": "upstream_error", "detail": detail}).encode()
    )
    try:
        text = await failure_of(peer, data)
    finally:
        await runner.cleanup()
    head = f"GET {peer}/blob/{digest_of(data).short}: answered 502 "
    assert text.startswith(head + "upstream_error: origin said: line two [31m xxx")
    assert len(text) == len(head) + REASON_MAX and text.endswith("x…")
    assert text.isprintable()


async def test_a_peer_error_that_is_not_our_json_is_quoted_as_text() -> None:
    data = payload(1000, seed=71)
    runner, peer = await start_fake_peer("error", {digest_of(data).hex: data})  # 500 "broken peer"
    try:
        text = await failure_of(peer, data)
    finally:
        await runner.cleanup()
    assert text == f"GET {peer}/blob/{digest_of(data).short}: answered 500 broken peer"


@pytest.mark.slow
async def test_the_agent_log_says_why_a_peer_whose_origin_is_broken_answered_502(
    s3_origin: OriginFixture, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = payload(200_000, seed=72)
    digest = await s3_origin.put(data)
    assert s3_origin.direct_endpoint is not None
    broken = await S3Proxy(s3_origin.direct_endpoint, mode="down").start()  # 500 to everything
    stack = Stack(s3_origin.url, s3_origin.endpoint, tmp_path / "stack")
    try:
        [peer] = await stack.start_peers(1, s3_endpoint=broken.url)
        agent = await stack.start_agent()
        with caplog.at_level(logging.WARNING, logger="cachesvc.readpath.tiers"):
            status, headers, body = await get(f"{agent}/pkg/{digest}")
            assert (status, headers["X-Cache-Tier"]) == (200, "ORIGIN")
            assert body == data
    finally:
        await stack.close()
        await broken.stop()
    said = f"GET {peer}/blob/{digest.short}: answered 502 upstream_error: GET {s3_origin.url}"
    lines = [r.getMessage() for r in caplog.records if said in r.getMessage()]
    assert len(lines) == 1, caplog.text
    assert f"/blobs/sha256/{digest.hex}: origin failed: 500: Internal Server Error" in lines[0]
