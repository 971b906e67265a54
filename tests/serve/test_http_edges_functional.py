"""Edge cases of the package response found in review: relay-mode ranges,
empty upstream bodies, early disconnects, preconditions, damaged L1 files."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket

import aiohttp
import pytest

from cachesvc.digest import Digest
from cachesvc.serve.service import CORE
from tests.conftest import OriginFixture
from tests.http import get
from tests.servers import Stack, eventually, metric, metrics_of

MiB = 1 << 20


@pytest.mark.parametrize("first", [0, 10 * MiB])
async def test_a_range_of_a_package_too_big_to_keep_completes(
    file_stack: Stack, file_origin: OriginFixture, first: int
) -> None:
    data = os.urandom(12 * MiB)
    digest = await file_origin.put(data)
    agent = await file_stack.start_agent(peers=[], cache_size=MiB)  # relay mode
    status, _, body = await asyncio.wait_for(
        get(f"{agent}/pkg/{digest}", Range=f"bytes={first}-{first + 99}"), timeout=15
    )
    assert status == 206 and body == data[first : first + 100]
    status, _, body = await asyncio.wait_for(get(f"{agent}/pkg/{digest}"), timeout=15)
    assert status == 200 and body == data


async def test_an_empty_upstream_body_for_a_real_digest_never_completes_a_200(
    file_stack: Stack, file_origin: OriginFixture
) -> None:
    digest = await file_origin.put(os.urandom(1000))
    assert file_origin.root is not None
    (file_origin.root / "blobs" / "sha256" / digest.hex).write_bytes(b"")
    agent = await file_stack.start_agent(peers=[])
    try:
        status, _, _ = await get(f"{agent}/pkg/{digest}")
    except aiohttp.ClientError:
        return  # aborted: the client knows it has nothing
    assert status == 502


async def test_clients_leaving_mid_hit_are_not_errors(
    file_stack: Stack, file_origin: OriginFixture, caplog: pytest.LogCaptureFixture
) -> None:
    digest = await file_origin.put(os.urandom(32 * MiB))
    agent = await file_stack.start_agent(peers=[])
    assert (await get(f"{agent}/pkg/{digest}"))[0] == 200
    port = int(agent.rsplit(":", 1)[1])
    for _ in range(5):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        writer.write(f"GET /pkg/{digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await writer.drain()
        await reader.read(1000)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        writer.close()
    await file_stack.stop(agent)  # every handler has finished: whatever it logs is in
    errors = [r.getMessage()[:200] for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


async def test_if_none_match_on_an_absent_package_is_404_not_304(
    file_stack: Stack,
) -> None:
    agent = await file_stack.start_agent(peers=[])
    absent = Digest(hashlib.sha256(b"never published").hexdigest())
    for tag in ("*", absent.etag):
        status, _, body = await get(f"{agent}/pkg/{absent}", **{"If-None-Match": tag})
        assert status == 404 and b'"not_found"' in body


async def test_if_range_with_another_etag_gets_the_whole_package(
    file_stack: Stack, file_origin: OriginFixture
) -> None:
    data = os.urandom(100_000)
    digest = await file_origin.put(data)
    agent = await file_stack.start_agent(peers=[])
    other = '"sha256:' + "0" * 64 + '"'
    status, _, body = await get(f"{agent}/pkg/{digest}", Range="bytes=0-9", **{"If-Range": other})
    assert (status, body) == (200, data)
    status, _, body = await get(
        f"{agent}/pkg/{digest}", Range="bytes=0-9", **{"If-Range": digest.etag}
    )
    assert (status, body) == (206, data[:10])
    status, _, body = await get(f"{agent}/pkg/{digest}", Range="bytes=9-3")  # invalid: ignored
    assert (status, body) == (200, data)


async def test_416_names_the_size(file_stack: Stack, file_origin: OriginFixture) -> None:
    digest = await file_origin.put(os.urandom(1000))
    agent = await file_stack.start_agent(peers=[])
    status, headers, _ = await get(f"{agent}/pkg/{digest}", Range="bytes=5000-")
    assert status == 416 and headers["content-range"] == "bytes */1000"


async def test_a_blob_that_shrank_on_disk_aborts_the_response(
    file_stack: Stack, file_origin: OriginFixture
) -> None:
    # A blob that shrank while closed is dropped at open and refetched
    # (tests/store/test_scrub_functional.py); here its file is open (hot) when it shrinks.
    digest = await file_origin.put(os.urandom(4 * MiB))
    agent = await file_stack.start_agent(peers=[], name="a")
    assert (await get(f"{agent}/pkg/{digest}"))[0] == 200

    async def committed() -> bool:  # the fill answers before it commits
        return b'"entries": 1' in (await get(f"{agent}/stats"))[2]

    await eventually(committed, "the fill committed")
    assert (await get(f"{agent}/pkg/{digest}"))[1]["x-cache-tier"] == "L1"  # its file is open now
    os.truncate(file_stack.root / "a" / "blobs" / "sha256" / digest.hex, MiB)
    with pytest.raises(aiohttp.ClientPayloadError):
        await asyncio.wait_for(get(f"{agent}/pkg/{digest}"), timeout=10)


async def test_a_small_range_aborted_on_a_shrunk_file_counts_as_a_request_not_as_bytes(
    file_stack: Stack, file_origin: OriginFixture
) -> None:
    data = os.urandom(4 * MiB)
    digest = await file_origin.put(data)
    agent = await file_stack.start_agent(peers=[], name="a")
    assert (await get(f"{agent}/pkg/{digest}"))[0] == 200
    await file_stack.apps[agent][CORE].flights.wait_idle()  # kept
    assert (await get(f"{agent}/pkg/{digest}"))[1]["x-cache-tier"] == "L1"  # its file is open
    before = await metrics_of(agent)
    os.truncate(file_stack.root / "a" / "blobs" / "sha256" / digest.hex, MiB)
    # Gathered (small), so no answer went out: the connection is dropped, and
    # aiohttp's client retries a GET dropped unanswered; the retry is refetched.
    status, headers, body = await asyncio.wait_for(
        get(f"{agent}/pkg/{digest}", Range=f"bytes={2 * MiB}-{2 * MiB + 999}"), 10
    )
    assert (status, headers["x-cache-tier"], body) == (
        206,
        "ORIGIN",
        data[2 * MiB : 2 * MiB + 1000],
    )
    after = await metrics_of(agent)
    requests, served = "cachesvc_requests_total", "cachesvc_bytes_served_total"
    assert metric(after, requests, tier="L1") == metric(before, requests, tier="L1") + 1
    assert metric(after, served, tier="L1") == metric(before, served, tier="L1")


@pytest.mark.parametrize("first", [0, 2 * MiB], ids=["streamed", "gathered"])
async def test_a_blob_that_shrank_under_a_ranged_get_is_dropped_and_refetched(
    file_stack: Stack, file_origin: OriginFixture, first: int
) -> None:
    # Ranges go to aiohttp's path (so do fan-out feeds and every GET with
    # --egress-limit): a short file there is dropped like on the fast path.
    data = os.urandom(4 * MiB)
    digest = await file_origin.put(data)
    agent = await file_stack.start_agent(peers=[], name="a")
    await file_stack.apps[agent][CORE].flights.wait_idle()
    assert (await get(f"{agent}/pkg/{digest}"))[0] == 200
    await file_stack.apps[agent][CORE].flights.wait_idle()  # kept
    assert (await get(f"{agent}/pkg/{digest}"))[1]["x-cache-tier"] == "L1"  # its file is open
    os.truncate(file_stack.root / "a" / "blobs" / "sha256" / digest.hex, MiB)
    with pytest.raises(aiohttp.ClientError):  # cut short: a body, or (gathered) no answer
        await asyncio.wait_for(get(f"{agent}/pkg/{digest}", Range=f"bytes={first}-"), 10)
    assert metric(await metrics_of(agent), "cachesvc_corrupt_total", found_by="serve") == 1
    assert digest not in file_stack.apps[agent][CORE].store
    status, headers, body = await get(f"{agent}/pkg/{digest}")
    assert (status, headers["x-cache-tier"], body) == (200, "ORIGIN", data)
