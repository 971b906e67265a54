"""The L1-hit fast path: hot hits answered without the web framework, the same
answer aiohttp gives, and every other request handed over on the same
connection. Real agents on loopback, raw sockets where keep-alive and
pipelining matter."""

from __future__ import annotations

import asyncio
import hashlib
import os

import aiohttp
import pytest

from cachesvc.digest import Digest
from cachesvc.serve.service import CORE
from tests.conftest import OriginFixture
from tests.http import get, head
from tests.servers import Stack, eventually, metric, metrics_of, payload

MiB = 1 << 20


async def fast_hits(agent: str) -> float:
    return metric(await metrics_of(agent), "cachesvc_fast_hits_total")


async def sending_in_a_task(stack: Stack, agent: str) -> None:
    """Wait until the socket buffer is full and the rest of a fast response
    goes out in a task (the reader has not read yet)."""
    await eventually(
        lambda: any(c.sending is not None for c in stack.hit_connections(agent)),
        "a fast response that did not fit the socket buffer",
        step=0.01,
    )


async def hot(
    stack: Stack, origin: OriginFixture, size: int, seed: int
) -> tuple[str, Digest, bytes]:
    """An agent with one package open in its store (two GETs: fill, then a lease)."""
    agent = await stack.start_agent(peers=[])
    data = payload(size, seed=seed)
    digest = await origin.put(data)
    assert (await get(f"{agent}/pkg/{digest}"))[2] == data
    await stack.apps[agent][CORE].flights.wait_idle()  # kept: the next GET opens it
    assert (await get(f"{agent}/pkg/{digest}"))[2] == data
    return agent, digest, data


async def test_a_hot_hit_is_answered_on_the_fast_path_like_aiohttp_would(
    file_stack: Stack, file_origin: OriginFixture
) -> None:
    agent = await file_stack.start_agent(peers=[])
    data = payload(100_000, seed=1)
    digest = await file_origin.put(data)
    await get(f"{agent}/pkg/{digest}")  # fill (aiohttp)
    await file_stack.apps[agent][CORE].flights.wait_idle()
    _, slow, _ = await get(f"{agent}/pkg/{digest}")  # a lease opens it (aiohttp)
    before = await fast_hits(agent)
    status, fast, body = await get(f"{agent}/pkg/{digest}")
    assert (status, body) == (200, data)
    assert await fast_hits(agent) == before + 1
    for headers in (slow, fast):
        headers.pop("Date")
    assert dict(fast) == dict(slow)  # the same headers, in any order


async def test_pipelined_hits_misses_and_garbage_on_one_connection_are_answered_in_order(
    file_stack: Stack, file_origin: OriginFixture
) -> None:
    agent, digest, data = await hot(file_stack, file_origin, 50_000, seed=2)
    other = payload(30_000, seed=3)
    cold = await file_origin.put(other)
    host, port = agent.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    req = "GET /pkg/{} HTTP/1.1\r\nHost: x\r\n\r\n"
    writer.write(
        (req.format(digest) + req.format(digest) + req.format(cold) + req.format(digest)).encode()
    )
    await writer.drain()
    bodies = [await read_response(reader) for _ in range(4)]
    assert [b[0] for b in bodies] == [200, 200, 200, 200]
    assert [b[1] for b in bodies] == [data, data, other, data]
    writer.write(b"GET /pkg/nope HTTP/1.1\r\nHost: x\r\n\r\n")  # handed over: aiohttp's 400
    await writer.drain()
    status, body = await read_response(reader)
    assert status == 400 and b"invalid_digest" in body
    writer.close()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    length = next(
        int(line.split(":")[1]) for line in lines if line.lower().startswith("content-length")
    )
    return status, await asyncio.wait_for(reader.readexactly(length), 10)


async def test_ranges_conditionals_and_head_of_a_hot_entry_go_to_aiohttp(
    file_stack: Stack, file_origin: OriginFixture
) -> None:
    agent, digest, data = await hot(file_stack, file_origin, 40_000, seed=4)
    before = await fast_hits(agent)
    status, headers, body = await get(f"{agent}/pkg/{digest}", Range="bytes=10-19")
    assert (status, body, headers["Content-Range"]) == (
        206,
        data[10:20],
        f"bytes 10-19/{len(data)}",
    )
    assert (await get(f"{agent}/pkg/{digest}", **{"If-None-Match": digest.etag}))[0] == 304
    status, headers, _ = await head(f"{agent}/pkg/{digest}")
    assert (status, headers["Content-Length"]) == (200, str(len(data)))
    assert (await get(f"{agent}/pkg/{digest}?x=1"))[2] == data
    assert await fast_hits(agent) == before  # none of these took the fast path


async def test_a_large_hot_entry_to_a_slow_reader_arrives_whole(
    file_stack: Stack, file_origin: OriginFixture
) -> None:
    agent, digest, data = await hot(file_stack, file_origin, 24 * MiB, seed=5)
    before = await fast_hits(agent)
    host, port = agent.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port), limit=1 << 16)
    writer.write(f"GET /pkg/{digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    await sending_in_a_task(file_stack, agent)
    status, body = await read_response(reader)
    assert status == 200 and hashlib.sha256(body).hexdigest() == digest.hex
    writer.close()
    assert await fast_hits(agent) == before + 1


async def test_an_evicted_entry_is_not_served_from_the_fast_path(
    file_stack: Stack, file_origin: OriginFixture
) -> None:
    agent, digest, data = await hot(file_stack, file_origin, 20_000, seed=6)
    store = file_stack.apps[agent][CORE].store
    assert await store.evict(digest)
    assert store.lease_hot(digest) is None
    status, headers, body = await get(f"{agent}/pkg/{digest}")
    assert (status, headers["X-Cache-Tier"], body) == (200, "ORIGIN", data)


async def test_with_an_egress_limit_the_fast_path_is_off(
    file_stack: Stack, file_origin: OriginFixture
) -> None:
    agent = await file_stack.start_agent(peers=[], egress_limit=64 * MiB)
    data = payload(20_000, seed=7)
    digest = await file_origin.put(data)
    for _ in range(3):
        assert (await get(f"{agent}/pkg/{digest}"))[2] == data
    assert await fast_hits(agent) == 0


async def test_stopping_lets_a_fast_response_in_flight_finish(
    file_stack: Stack, file_origin: OriginFixture
) -> None:
    agent, digest, data = await hot(file_stack, file_origin, 24 * MiB, seed=8)
    host, port = agent.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port), limit=1 << 16)
    writer.write(f"GET /pkg/{digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    await sending_in_a_task(file_stack, agent)
    stopping = asyncio.ensure_future(file_stack.stop(agent))
    status, body = await read_response(reader)
    assert status == 200 and len(body) == len(data) and body == data
    await asyncio.wait_for(stopping, 10)
    writer.close()


async def test_a_small_hot_entry_that_shrank_on_disk_is_cut_short_and_dropped(
    file_stack: Stack, file_origin: OriginFixture
) -> None:
    agent, digest, data = await hot(file_stack, file_origin, 32_000, seed=9)
    path = file_stack.apps[agent][CORE].store.path_of(digest)
    os.truncate(path, 10_000)
    before = await fast_hits(agent)
    host, port = agent.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET /pkg/{digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert await asyncio.wait_for(reader.read(), 10) == b""  # cut before any byte
    writer.close()
    assert await fast_hits(agent) == before  # not counted as served

    async def dropped() -> bool:  # the drop runs in a task
        return metric(await metrics_of(agent), "cachesvc_corrupt_total", found_by="serve") == 1

    await eventually(dropped, "the entry dropped as corrupt")
    assert digest not in file_stack.apps[agent][CORE].store
    status, headers, body = await get(f"{agent}/pkg/{digest}")
    assert (status, headers["X-Cache-Tier"], body) == (200, "ORIGIN", data)


# -- peers: /blob hits -------------------------------------------------------------------


async def hot_peer(
    stack: Stack, origin: OriginFixture, token: str | None = None, **kw: object
) -> tuple[str, Digest, bytes]:
    """A peer with one package open in its store."""
    (peer,) = await stack.start_peers(1, peer_token=token, **kw)
    data = payload(40_000, seed=10)
    digest = await origin.put(data)
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    assert (await get(f"{peer}/blob/{digest}", **auth))[2] == data
    await stack.apps[peer][CORE].flights.wait_idle()
    return peer, digest, data


async def test_a_peer_answers_hot_blob_hits_on_the_fast_path_after_the_token(
    file_stack: Stack, file_origin: OriginFixture
) -> None:
    peer, digest, data = await hot_peer(file_stack, file_origin, token="s3cret")
    newer = await file_origin.put(payload(1000, seed=11))
    assert (await get(f"{peer}/blob/{newer}", Authorization="Bearer s3cret"))[0] == 200
    await file_stack.apps[peer][CORE].flights.wait_idle()  # kept
    store = file_stack.apps[peer][CORE].store
    order = list(store.digests())
    before = await fast_hits(peer)
    assert (await get(f"{peer}/blob/{digest}"))[0] == 401  # aiohttp's answer
    assert (await get(f"{peer}/blob/{digest}", Authorization="Bearer nope"))[0] == 401
    assert list(store.digests()) == order  # a refused request does not make it recent
    status, headers, body = await get(
        f"{peer}/blob/{digest}", Authorization="Bearer s3cret", **{"X-Cachesvc-Forwarded": "1"}
    )
    assert (status, headers["X-Cache-Tier"], body) == (200, "L2", data)
    assert await fast_hits(peer) == before + 1
    assert metric(await metrics_of(peer), "cachesvc_upload_bytes_total") >= len(data)


async def test_a_peer_fast_path_redirects_like_the_tracker_and_assigns_once(
    file_stack: Stack, file_origin: OriginFixture
) -> None:
    peer, digest, data = await hot_peer(file_stack, file_origin, fanout=1)
    a, b = "http://127.0.0.1:1", "http://127.0.0.1:2"
    fan = {"X-Cachesvc-Forwarded": "1", "X-Cachesvc-Fanout": "1"}
    status, _, body = await get(f"{peer}/blob/{digest}", **fan, **{"X-Cachesvc-Advertise": a})
    assert (status, body) == (200, data)  # the owner's one slot: a
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        headers = {**fan, "X-Cachesvc-Advertise": b}
        async with s.get(f"{peer}/blob/{digest}", headers=headers, allow_redirects=False) as r:
            assert r.status == 307
            assert r.headers["X-Cachesvc-Parent"] == a
            assert r.headers["Location"] == f"{a}/pkg/{digest}"
            assert await r.json() == {"parent": a}
    assert await fast_hits(peer) >= 1
    members = {m.url: m.children for m in file_stack.apps[peer][CORE].tracker.members(digest)}
    assert members[a] == 1 and sum(members.values()) == 2  # each request assigned once


# -- HTTP/1.1 on the wire: Connection: close, versions ---------------------------------


async def exchange(agent: str, request: bytes) -> bytes:
    """Everything the server sends for ``request`` until it closes the
    connection (bounded: a server that keeps it open fails the test)."""
    host, port = agent.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


def split_response(answer: bytes) -> tuple[bytes, list[tuple[bytes, bytes]], bytes]:
    """Status line, the header fields but Date (sorted), and what follows the head."""
    head, _, rest = answer.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    fields = [tuple(line.split(b": ", 1)) for line in lines]
    return status, sorted((k.lower(), v) for k, v in fields if k.lower() != b"date"), rest


@pytest.mark.parametrize(
    "version, connection",
    [("1.1", "Connection: close\r\n"), ("1.0", ""), ("1.0", "Connection: close\r\n")],
)
async def test_a_hit_asked_for_with_connection_close_is_answered_then_the_connection_closes(
    file_stack: Stack, file_origin: OriginFixture, version: str, connection: str
) -> None:
    agent, digest, data = await hot(file_stack, file_origin, 20_000, seed=12)
    request = f"GET /pkg/{digest} HTTP/{version}\r\nHost: x\r\n{connection}\r\n".encode()
    status, _, body = split_response(await exchange(agent, request))
    assert status == f"HTTP/{version} 200 OK".encode() and body == data


async def test_pipelined_hits_after_connection_close_are_not_answered(
    file_stack: Stack, file_origin: OriginFixture
) -> None:
    agent, digest, data = await hot(file_stack, file_origin, 20_000, seed=13)
    req = "GET /pkg/{} HTTP/1.1\r\nHost: x\r\n{}\r\n"
    request = (req.format(digest, "") + req.format(digest, "Connection: close\r\n")) * 2
    answer = await exchange(agent, request.encode())
    assert answer.count(b"HTTP/1.1 200 OK\r\n") == 2 and answer.endswith(data)


@pytest.mark.parametrize("version", ["2.0", "0.9", "1.2", "3.0"])
async def test_a_hit_asked_for_in_another_http_version_is_refused_and_the_connection_closed(
    file_stack: Stack, file_origin: OriginFixture, version: str
) -> None:
    agent, digest, data = await hot(file_stack, file_origin, 20_000, seed=14)
    before = await fast_hits(agent)
    request = f"GET /pkg/{digest} HTTP/{version}\r\nHost: x\r\n\r\n".encode()
    status, _, body = split_response(await exchange(agent, request))
    assert status in (b"HTTP/1.1 505 HTTP Version Not Supported", b"HTTP/1.0 400 Bad Request")
    assert data not in body
    assert await fast_hits(agent) == before


@pytest.mark.parametrize("connection", ["", "Connection: close\r\n"])
async def test_the_fast_path_and_aiohttp_answer_with_the_same_header_fields(
    file_stack: Stack, file_origin: OriginFixture, connection: str
) -> None:
    agent, digest, data = await hot(file_stack, file_origin, 20_000, seed=15)
    before = await fast_hits(agent)
    hit = f"GET /pkg/{digest} HTTP/1.1\r\nHost: x\r\n{connection}".encode()
    to_aiohttp = hit + b'If-None-Match: "sha256:other"\r\n'  # not a match: a whole 200
    # then (aiohttp refuses requests pipelined after a Connection: close) a version refused
    refused = b"" if connection else f"GET /pkg/{digest} HTTP/2.0\r\nHost: x\r\n\r\n".encode()
    fast = split_response(await exchange(agent, hit + b"\r\n" + refused))
    slow = split_response(await exchange(agent, to_aiohttp + b"\r\n" + refused))
    assert await fast_hits(agent) == before + 1  # the first hit only
    assert fast[:2] == slow[:2]
    if connection:
        assert fast[2] == slow[2] == data
        return
    fast_refusal, slow_refusal = split_response(fast[2][20_000:]), split_response(slow[2][20_000:])
    assert fast_refusal[0] == b"HTTP/1.1 505 HTTP Version Not Supported"
    assert fast_refusal[1:] == slow_refusal[1:]  # aiohttp still echoes the version it refuses
    assert (b"connection", b"close") in fast_refusal[1]
