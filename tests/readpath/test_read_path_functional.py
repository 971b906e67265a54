"""The read path end to end: real agents and peers on loopback over a real S3
server (moto, behind a counting proxy) or a file:// origin."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from cachesvc.digest import Digest
from cachesvc.serve.service import CORE
from cachesvc.upstream.ring import Ring
from tests.conftest import OriginFixture, S3OriginFixture
from tests.http import Reply, get, head
from tests.servers import (
    Stack,
    digest_of,
    eventually,
    metric,
    metrics_of,
    payload,
    start_fake_peer,
    start_server,
    store_files,
)

pytestmark = pytest.mark.slow  # most tests take over a second

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

MiB = 1 << 20


async def settled(url: str) -> dict[str, Any]:
    """/stats once no fetch is running (a response ends before its fsync)."""

    async def idle() -> dict[str, Any] | None:
        stats: dict[str, Any] = (await get(f"{url}/stats")).json()
        return stats if stats["inflight_fetches"] == 0 else None

    return await eventually(idle, f"{url} done fetching")


# -- tiers ------------------------------------------------------------------------


async def test_first_get_comes_from_l2_then_l1_on_every_origin(
    origin: OriginFixture, tmp_path: Path
) -> None:
    stack = Stack(origin.url, origin.endpoint, tmp_path / "stack")
    try:
        await stack.start_peers(3)
        agent = await stack.start_agent()
        data = payload(3 * MiB + 17)
        digest = await origin.put(data)

        status, headers, body = await get(f"{agent}/pkg/{digest}")
        assert status == 200 and body == data
        assert headers["x-cache-tier"] == "L2"
        assert headers["etag"] == f'"{digest}"'
        assert headers["cache-control"] == "public, max-age=31536000, immutable"
        assert headers["accept-ranges"] == "bytes"

        status, headers, body = await get(f"{agent}/pkg/{digest.hex}")
        assert (status, headers["x-cache-tier"], body) == (200, "L1", data)
    finally:
        await stack.close()


async def test_a_second_agent_gets_l2_not_origin(stack: Stack, s3_origin: S3OriginFixture) -> None:
    await stack.start_peers(3)
    a1, a2 = await stack.start_agent(), await stack.start_agent()
    data = payload(2 * MiB, seed=2)
    digest = await s3_origin.put(data)

    assert (await get(f"{a1}/pkg/{digest}"))[1]["x-cache-tier"] == "L2"
    status, headers, body = await get(f"{a2}/pkg/{digest}")
    assert (status, body) == (200, data)
    assert headers["x-cache-tier"] == "L2"
    assert s3_origin.origin_gets(digest) == 1
    peer_text = "".join([await metrics_of(p) for p in stack.peers])
    assert metric(peer_text, "cachesvc_requests_total", tier="L2") == 1  # the owner's hit


async def test_agent_without_peers_reads_the_origin(
    stack: Stack, s3_origin: S3OriginFixture
) -> None:
    agent = await stack.start_agent(peers=[])
    data = payload(MiB, seed=3)
    digest = await s3_origin.put(data)
    status, headers, body = await get(f"{agent}/pkg/{digest}")
    assert (status, headers["x-cache-tier"], body) == (200, "ORIGIN", data)


async def test_100_concurrent_cold_gets_over_two_agents_cost_one_origin_get(
    stack: Stack, s3_origin: S3OriginFixture
) -> None:
    await stack.start_peers(3)
    agents = [await stack.start_agent(), await stack.start_agent()]
    data = payload(8 * MiB, seed=4)
    digest = await s3_origin.put(data)
    s3_origin.proxy.mode, s3_origin.proxy.delay = "slow", 0.3  # everyone arrives first

    async with aiohttp.ClientSession() as session:

        async def one(i: int) -> str:
            async with session.get(f"{agents[i % 2]}/pkg/{digest}") as r:
                body = await r.read()
                assert r.status == 200 and hashlib.sha256(body).hexdigest() == digest.hex
                return r.headers["x-cache-tier"]

        tiers = await asyncio.gather(*(one(i) for i in range(100)))
    assert s3_origin.origin_gets(digest) == 1
    assert set(tiers) == {"L2"}
    text = "".join([await metrics_of(a) for a in agents])
    assert metric(text, "cachesvc_coalesced_total") == 98  # 100 requests, 2 fills


# -- HTTP semantics -------------------------------------------------------------------


async def test_range_head_and_304(stack: Stack, s3_origin: S3OriginFixture) -> None:
    await stack.start_peers(1)
    agent = await stack.start_agent()
    data = payload(100_000, seed=5)
    digest = await s3_origin.put(data)

    status, headers, _ = await head(f"{agent}/pkg/{digest}")
    assert status == 200 and headers["content-length"] == str(len(data))
    assert headers["x-cache-tier"] == "L2"
    assert s3_origin.origin_gets(digest) == 0  # HEAD downloads nothing

    status, headers, body = await get(f"{agent}/pkg/{digest}", Range="bytes=10-19")
    assert status == 206 and body == data[10:20]
    assert headers["content-range"] == f"bytes 10-19/{len(data)}"
    status, headers, body = await get(f"{agent}/pkg/{digest}", Range="bytes=-5")
    assert (status, body) == (206, data[-5:])
    status, headers, body = await get(f"{agent}/pkg/{digest}", Range="bytes=99990-")
    assert (status, body) == (206, data[99990:])
    status, headers, body = await get(f"{agent}/pkg/{digest}", Range=f"bytes={len(data)}-")
    assert status == 416 and b"range_not_satisfiable" in body

    status, headers, body = await get(f"{agent}/pkg/{digest}", **{"If-None-Match": f'"{digest}"'})
    assert status == 304 and body == b"" and headers["etag"] == f'"{digest}"'
    status, headers, _ = await head(f"{agent}/pkg/{digest}")
    assert headers["x-cache-tier"] == "L1"


@pytest.mark.parametrize(
    "path",
    [
        "/pkg/sha256:" + "A" * 64,  # upper case
        "/pkg/" + "a" * 63,  # short
        "/pkg/" + "a" * 65,  # long
        "/pkg/md5:" + "a" * 64,  # other algorithm
        "/pkg/sha256:" + "g" * 64,  # not hex
        "/pkg/sha256%3A" + "a" * 64,  # encoded colon
        "/pkg/" + "a" * 32 + "%2F" + "a" * 32,  # encoded slash
        "/pkg/" + "a" * 32 + "/" + "a" * 32,  # a real slash
        "/pkg/",
    ],
)
async def test_invalid_digests_get_400_invalid_digest(stack: Stack, path: str) -> None:
    agent = await stack.start_agent(peers=[])
    reply = await get(URL(agent + path, encoded=True))
    assert reply.status == 400
    assert reply.json()["error"] == "invalid_digest"


async def test_unknown_digest_is_404_and_negative_cached(
    stack: Stack, s3_origin: S3OriginFixture
) -> None:
    await stack.start_peers(2)
    agent = await stack.start_agent()
    missing = Digest("0" * 64)
    for _ in range(5):
        status, _, body = await get(f"{agent}/pkg/{missing}")
        assert status == 404 and b'"not_found"' in body
    assert s3_origin.origin_gets(missing) == 1
    assert metric(await metrics_of(agent), "cachesvc_negative_cache_hits_total") == 4


async def test_a_head_the_origin_answers_404_is_negative_cached_for_the_get_after_it(
    stack: Stack, s3_origin: OriginFixture
) -> None:
    agent = await stack.start_agent()  # no peers: the origin is asked directly
    missing = Digest("1" * 64)
    assert (await head(f"{agent}/pkg/{missing}"))[0] == 404
    status, _, body = await get(f"{agent}/pkg/{missing}")
    assert status == 404 and b'"not_found"' in body
    assert s3_origin.origin_gets(missing) == 0  # the GET never reached the origin
    assert metric(await metrics_of(agent), "cachesvc_negative_cache_hits_total") == 1


# -- integrity ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["corrupt", "truncate"])
async def test_bad_origin_bytes_are_refused_and_not_kept(
    stack: Stack, s3_origin: S3OriginFixture, mode: str
) -> None:
    peer = (await stack.start_peers(1))[0]
    agent = await stack.start_agent()
    data = payload(3 * MiB, seed=6)
    digest = await s3_origin.put(data)
    s3_origin.proxy.mode = mode

    try:  # a failure before the first byte is a 502; after it, a cut body
        status, _, _ = await get(f"{agent}/pkg/{digest}")
        assert status == 502
    except aiohttp.ClientPayloadError:
        pass

    async def refused_everywhere() -> bool:  # the refusal settles in both stores
        for url in (agent, peer):
            if (await get(f"{url}/stats"))[2].count(b'"entries": 0') != 1:
                return False
        return not [f for f in store_files(stack.root) if "blobs" in f or "tmp/" in f]

    await eventually(refused_everywhere, "nothing kept in either store")

    s3_origin.proxy.mode = "ok"
    status, _, body = await get(f"{agent}/pkg/{digest}")
    assert status == 200 and body == data


async def test_a_peer_sending_wrong_bytes_is_refused_and_the_next_source_serves(
    stack: Stack, s3_origin: S3OriginFixture
) -> None:
    data = payload(MiB, seed=7)
    digest = await s3_origin.put(data)
    runner, bad_peer = await start_fake_peer("corrupt", {digest.hex: data})
    try:
        agent = await stack.start_agent(peers=[bad_peer])
        with pytest.raises(aiohttp.ClientPayloadError):
            await get(f"{agent}/pkg/{digest}")
        text = await metrics_of(agent)
        assert metric(text, "cachesvc_digest_mismatch_total") == 1

        async def served() -> Reply | None:
            answer = await get(f"{agent}/pkg/{digest}")
            return answer if answer[0] == 200 else None

        # the refill from the origin runs in the background
        _, headers, body = await eventually(served, "a 200 after the refill", step=0.05)
        assert body == data and headers["x-cache-tier"] in ("ORIGIN", "L1")
    finally:
        await runner.cleanup()


async def test_a_lie_caught_before_answering_is_invisible_to_the_client(
    stack: Stack, s3_origin: OriginFixture
) -> None:
    # A body of at most 64 KiB is gathered and verified before anything is
    # sent: a refused source costs the request nothing but the walk to the next.
    data = payload(40_000, seed=21)
    digest = await s3_origin.put(data)
    runner, liar = await start_fake_peer("corrupt", {digest.hex: data})
    try:
        agent = await stack.start_agent(peers=[liar])
        for expected in ("ORIGIN", "L1"):
            status, headers, body = await get(f"{agent}/pkg/{digest}")
            assert (status, headers["x-cache-tier"], body) == (200, expected, data)
            await stack.apps[agent][CORE].flights.wait_idle()  # kept
        assert metric(await metrics_of(agent), "cachesvc_digest_mismatch_total") == 1
        stats = json.loads((await get(f"{agent}/stats"))[2])
        assert stats["peers_down"] == [liar]  # the liar is avoided
        assert s3_origin.origin_gets(digest) == 1
    finally:
        await runner.cleanup()


class ResumePeers:
    """Two real servers in the peers' place for one package: the first in ring
    order sends half the body and breaks off; the second answers the resumed
    (ranged) GET with the right bytes but a Content-Range claiming a larger
    total (a peer that holds another object under this digest's name)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.urls: list[str] = []
        self.runners: list[web.AppRunner] = []
        self.resumed = 0

    async def start(self, digest: Digest) -> None:
        for _ in range(2):
            app = web.Application()
            app.router.add_get("/blob/{digest}", self._blob)
            runner, url = await start_server(app)
            self.runners.append(runner)
            self.urls.append(url)
        self.first = Ring(self.urls).owners(digest)[0]

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        if f"http://{request.host}" == self.first:
            resp = web.StreamResponse(headers={"X-Cache-Tier": "L2"})
            resp.content_length = len(self.data)
            await resp.prepare(request)
            await resp.write(self.data[: len(self.data) // 2])
            assert request.transport is not None
            request.transport.abort()
            return resp
        self.resumed += 1
        start = int(request.headers.get("Range", "bytes=0-")[6:].split("-")[0] or 0)
        claimed = len(self.data) + 4096
        resp = web.StreamResponse(status=206, headers={"X-Cache-Tier": "L2"})
        resp.headers["Content-Range"] = f"bytes {start}-{claimed - 1}/{claimed}"
        resp.content_length = len(self.data) - start
        await resp.prepare(request)
        await resp.write(self.data[start:])
        return resp

    async def close(self) -> None:
        for runner in self.runners:
            await runner.cleanup()


async def test_a_resumed_source_that_claims_another_size_is_not_used(
    stack: Stack, s3_origin: OriginFixture
) -> None:
    """The size is fixed by the first source; a source resumed mid-body that
    claims another total has failed (the walk moves on to the origin), even
    when the bytes it would send happen to check out."""
    data = payload(MiB, seed=9)
    digest = await s3_origin.put(data)
    peers = ResumePeers(data)
    await peers.start(digest)
    try:
        agent = await stack.start_agent(peers=peers.urls, fanout=0)
        status, _, body = await get(f"{agent}/pkg/{digest}")
        assert (status, body == data, peers.resumed) == (200, True, 1)
        assert s3_origin.origin_gets(digest) == 1  # the rest came from the origin
    finally:
        await peers.close()


# -- failures -------------------------------------------------------------------------


async def test_dead_owner_fails_over_to_the_next_peer(
    stack: Stack, s3_origin: S3OriginFixture
) -> None:
    peers = await stack.start_peers(3)
    agent = await stack.start_agent()
    data = payload(MiB, seed=8)
    digest = await s3_origin.put(data)
    from cachesvc.upstream.ring import Ring

    owner = Ring(peers).owners(digest)[0]
    await stack.stop(owner)
    status, headers, body = await get(f"{agent}/pkg/{digest}")
    assert (status, headers["x-cache-tier"], body) == (200, "L2", data)
    stats = (await get(f"{agent}/stats"))[2]
    assert owner.encode() in stats.split(b'"peers_down"')[1]


async def test_all_peers_down_falls_back_to_the_origin(
    stack: Stack, s3_origin: S3OriginFixture
) -> None:
    peers = await stack.start_peers(2)
    agent = await stack.start_agent()
    for p in peers:
        await stack.stop(p)
    data = payload(MiB, seed=9)
    digest = await s3_origin.put(data)
    status, headers, body = await get(f"{agent}/pkg/{digest}")
    assert (status, headers["x-cache-tier"], body) == (200, "ORIGIN", data)


async def test_peers_marked_down_by_an_origin_blip_still_coalesce_the_az_on_the_owner(
    stack: Stack, s3_origin: S3OriginFixture
) -> None:
    """While the origin is down every peer answers 502, so each agent marks
    them all down. Right after, the agents must still go through the owner
    (one origin GET for the AZ), not each straight to the origin."""
    peers = await stack.start_peers(2)
    agents = [await stack.start_agent(), await stack.start_agent()]
    data = payload(MiB, seed=13)
    digest = await s3_origin.put(data)

    s3_origin.proxy.mode = "down"
    during = await asyncio.gather(*(get(f"{a}/pkg/{digest}") for a in agents))
    assert all(status in (502, 504) for status, _, _ in during)
    for a in agents:
        assert sorted((await settled(a))["peers_down"]) == sorted(peers)

    s3_origin.proxy.mode = "ok"
    before = s3_origin.origin_gets(digest)
    for a in agents:
        status, headers, body = await get(f"{a}/pkg/{digest}")
        assert (status, body) == (200, data) and headers["x-cache-tier"] != "ORIGIN"
    assert s3_origin.origin_gets(digest) - before == 1


async def test_a_hanging_peer_costs_a_bounded_wait(
    stack: Stack, s3_origin: S3OriginFixture
) -> None:
    runner, hung = await start_fake_peer("hang", {})
    try:
        agent = await stack.start_agent(peers=[hung], origin_timeout=1.0)
        data = payload(1000, seed=10)
        digest = await s3_origin.put(data)
        status, headers, body = await get(f"{agent}/pkg/{digest}")
        assert (status, headers["x-cache-tier"], body) == (200, "ORIGIN", data)
    finally:
        await runner.cleanup()


async def test_origin_outage_serves_cached_and_fails_uncached_fast(
    stack: Stack, s3_origin: S3OriginFixture
) -> None:
    await stack.start_peers(1)
    agent = await stack.start_agent()
    cached = await s3_origin.put(payload(1000, seed=11))
    uncached = await s3_origin.put(payload(1000, seed=12))
    assert (await get(f"{agent}/pkg/{cached}"))[0] == 200

    s3_origin.proxy.mode = "down"
    status, headers, _ = await get(f"{agent}/pkg/{cached}")
    assert (status, headers["x-cache-tier"]) == (200, "L1")
    loop = asyncio.get_running_loop()
    start = loop.time()
    status, _, body = await get(f"{agent}/pkg/{uncached}")
    assert status in (502, 504) and b"upstream_" in body
    assert loop.time() - start < 10  # fails, does not hang


async def test_restart_keeps_the_cache(stack: Stack, s3_origin: S3OriginFixture) -> None:
    agent = await stack.start_agent(peers=[])
    data = payload(MiB, seed=13)
    digest = await s3_origin.put(data)
    assert (await get(f"{agent}/pkg/{digest}"))[1]["x-cache-tier"] == "ORIGIN"
    await stack.restart(agent)
    s3_origin.proxy.mode = "down"
    status, headers, body = await get(f"{agent}/pkg/{digest}")
    assert (status, headers["x-cache-tier"], body) == (200, "L1", data)


async def test_eviction_keeps_the_store_within_its_cap(
    stack: Stack, s3_origin: S3OriginFixture
) -> None:
    agent = await stack.start_agent(peers=[], cache_size=5 * MiB)
    digests = [await s3_origin.put(payload(MiB, seed=100 + i)) for i in range(12)]
    for d in digests:
        assert (await get(f"{agent}/pkg/{d}"))[0] == 200
    stats = await settled(agent)
    assert stats["bytes"] <= 5 * MiB and stats["entries"] >= 3
    assert metric(await metrics_of(agent), "cachesvc_evictions_total") >= 7
    status, headers, _ = await get(f"{agent}/pkg/{digests[-1]}")
    assert headers["x-cache-tier"] == "L1"  # the most recent survives
    blobs = [f for f in store_files(stack.root / "agent-0") if f.startswith("blobs")]
    assert len(blobs) == stats["entries"]


async def test_peer_token_is_required_when_set(
    stack: Stack, s3_origin: S3OriginFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    peers = await stack.start_peers(1, peer_token="s3cret")
    digest = await s3_origin.put(b"x" * 100)
    status, _, body = await get(f"{peers[0]}/blob/{digest}")
    assert status == 401 and b"unauthorized" in body
    status, _, body = await get(f"{peers[0]}/blob/{digest}", Authorization="Bearer wrong")
    assert status == 401
    agent = await stack.start_agent(peer_token="s3cret")
    status, headers, body = await get(f"{agent}/pkg/{digest}")
    assert (status, headers["x-cache-tier"]) == (200, "L2")


async def test_ops_endpoints_answer(stack: Stack) -> None:
    agent = await stack.start_agent(peers=[])
    assert (await get(f"{agent}/healthz"))[0] == 200
    assert (await get(f"{agent}/readyz"))[0] == 200
    text = await metrics_of(agent)
    for name in ("cachesvc_cache_bytes", "cachesvc_cache_entries", "cachesvc_request_seconds"):
        assert name in text


def test_payload_digest_helper_is_sha256() -> None:
    assert digest_of(b"abc").hex == hashlib.sha256(b"abc").hexdigest()


# -- pressure ---------------------------------------------------------------------------


async def test_a_package_larger_than_the_cache_streams_through_unkept(
    stack: Stack, s3_origin: S3OriginFixture
) -> None:
    agent = await stack.start_agent(peers=[], cache_size=MiB)
    data = payload(6 * MiB, seed=20)
    digest = await s3_origin.put(data)
    for _ in range(2):
        status, headers, body = await get(f"{agent}/pkg/{digest}")
        assert (status, headers["x-cache-tier"], body) == (200, "ORIGIN", data)
    assert s3_origin.origin_gets(digest) == 2
    assert not [f for f in store_files(stack.root / "agent-0") if not f.startswith("index")]


async def test_a_disk_that_fills_mid_download_still_serves_the_request(
    stack: Stack, s3_origin: S3OriginFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import os

    agent = await stack.start_agent(peers=[])
    data = payload(5 * MiB, seed=21)
    digest = await s3_origin.put(data)
    real = os.pwrite
    writes = {"n": 0}

    def fills_up(fd: int, buf: ReadableBuffer, offset: int) -> int:
        writes["n"] += 1
        if writes["n"] > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, buf, offset)

    monkeypatch.setattr("cachesvc.store.castore.os.pwrite", fills_up)
    status, headers, body = await get(f"{agent}/pkg/{digest}")
    assert (status, body) == (200, data)
    monkeypatch.undo()
    stats = (await get(f"{agent}/stats"))[2]
    assert b'"entries": 0' in stats
    status, headers, body = await get(f"{agent}/pkg/{digest}")
    assert (status, headers["x-cache-tier"], body) == (200, "ORIGIN", data)
    assert (await get(f"{agent}/pkg/{digest}"))[1]["x-cache-tier"] == "L1"


async def test_too_many_fetches_are_shed_with_503_and_retry_after(
    stack: Stack, s3_origin: S3OriginFixture
) -> None:
    agent = await stack.start_agent(peers=[], max_fetches=1, max_queued=1)
    digests = [await s3_origin.put(payload(1000, seed=30 + i)) for i in range(3)]
    s3_origin.proxy.mode, s3_origin.proxy.delay = "slow", 0.5
    results = await asyncio.gather(*(get(f"{agent}/pkg/{d}") for d in digests))
    statuses = sorted(r[0] for r in results)
    assert statuses == [200, 200, 503]
    shed = next(r for r in results if r[0] == 503)
    assert shed[1]["retry-after"] and b'"overloaded"' in shed[2]


async def test_a_slow_owner_is_waited_for_never_bypassed_to_the_origin(
    stack: Stack, s3_origin: S3OriginFixture
) -> None:
    await stack.start_peers(2)
    agent = await stack.start_agent(peer_read_timeout=0.5)
    data = payload(MiB, seed=50)
    digest = await s3_origin.put(data)
    s3_origin.proxy.mode, s3_origin.proxy.delay = "slow", 1.5  # > the idle-read timeout
    status, headers, body = await get(f"{agent}/pkg/{digest}")
    assert (status, headers["x-cache-tier"], body) == (200, "L2", data)
    assert s3_origin.origin_gets(digest) == 1


async def test_agents_that_disagree_about_the_ring_still_get_one_answer_each(
    stack: Stack, s3_origin: S3OriginFixture
) -> None:
    peers = await stack.start_peers(3)
    agents = [await stack.start_agent(peers=peers[:2]), await stack.start_agent(peers=peers[1:])]
    digests = [await s3_origin.put(payload(10_000, seed=60 + i)) for i in range(10)]
    for d in digests:
        for a in agents:
            status, headers, _ = await get(f"{a}/pkg/{d}")
            assert status == 200 and headers["x-cache-tier"] == "L2"
    # Two views of the ring mean at most two owners per digest; peers never forward.
    assert all(s3_origin.origin_gets(d) <= 2 for d in digests)
    text = "".join([await metrics_of(p) for p in peers])
    assert metric(text, "cachesvc_upstream_fetches_total", upstream="peer") == 0
