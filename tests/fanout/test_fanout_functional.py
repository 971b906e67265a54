"""Fan-out end to end: agents that hold or fill a package feed other agents,
chosen by the owner peer's tracker. Real peers and agents on loopback over a
real S3 server (moto, behind a counting proxy); misbehaving agents are real
servers that lie or die."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, NamedTuple

import aiohttp
import pytest
from aiohttp import web

from cachesvc.digest import Digest
from cachesvc.fanout.parents import ADVERTISE, FANOUT, MAX_PARENTS
from cachesvc.readpath.flight import Flight
from cachesvc.serve.service import CORE
from cachesvc.upstream.peer_client import FORWARDED, PARENT
from cachesvc.upstream.ring import Ring
from tests.conftest import OriginFixture
from tests.http import Fetched, fetch, get, get_json, post_json, request
from tests.servers import Stack, eventually, free_port, metric, metrics_of, payload, start_server

pytestmark = pytest.mark.slow  # most tests take over a second

MiB = 1 << 20
TOKEN = "operator-s3cret"


async def uploads(urls: list[str]) -> dict[str, float]:
    return {u: metric(await metrics_of(u), "cachesvc_upload_bytes_total") for u in urls}


async def from_agents(urls: list[str]) -> float:
    """Fetches the agents made from other agents (ok or not)."""
    total = 0.0
    for url in urls:
        total += metric(await metrics_of(url), "cachesvc_upstream_fetches_total", upstream="agent")
    return total


async def fill_under_way(
    stack: Stack, agent: str, digest: Digest, ready: Callable[[Flight], bool]
) -> Flight:
    """The agent's running fill of ``digest`` once ``ready`` holds (bounded)."""

    def ready_flight() -> Flight | None:
        flight = stack.apps[agent][CORE].flights.get(digest)
        return flight if flight is not None and ready(flight) else None

    return await eventually(ready_flight, f"a ready fill of {digest.short} on {agent}", step=0.01)


def owner_of(peers: list[str], digest: Digest) -> str:
    owner = Ring(peers).owner(digest)
    assert owner is not None
    return owner


async def storm(
    agents: list[str], digest: Digest, attempts: int = 1
) -> list[tuple[int, bytes | None]]:
    got = await asyncio.gather(*(fetch(f"{a}/pkg/{digest}", attempts) for a in agents))
    return [g.received for g in got]


async def test_eight_agents_with_fanout_2_cost_one_origin_get_and_feed_each_other(
    stack: Stack, s3_origin: OriginFixture
) -> None:
    await stack.start_peers(3, fanout=2, egress_limit=16 * MiB)
    agents = [await stack.start_agent(fanout=2, egress_limit=16 * MiB) for _ in range(8)]
    data = payload(4 * MiB, seed=81)
    digest = await s3_origin.put(data)
    results = await storm(agents, digest)
    assert all(r == (200, data) for r in results)
    assert s3_origin.origin_gets(digest) == 1
    assert await from_agents(agents) >= 1  # some agent was served by another agent
    up = await uploads([owner_of(stack.peers, digest)])
    assert max(up.values()) <= 2 * len(data) + 1  # the owner fed at most K agents


async def test_fanout_0_is_the_owner_only_design(stack: Stack, s3_origin: OriginFixture) -> None:
    await stack.start_peers(3, fanout=0)
    agents = [await stack.start_agent(fanout=0) for _ in range(6)]
    data = payload(2 * MiB, seed=82)
    digest = await s3_origin.put(data)
    assert all(r == (200, data) for r in await storm(agents, digest))
    assert s3_origin.origin_gets(digest) == 1
    assert await from_agents(agents) == 0
    owner = owner_of(stack.peers, digest)
    assert (await uploads([owner]))[owner] == 6 * len(data)
    assert sum((await uploads(agents)).values()) == 0


async def test_agents_that_cannot_be_parents_are_still_children(
    stack: Stack, s3_origin: OriginFixture
) -> None:
    """Agents with --fanout 0 are fed by others but feed no one."""
    await stack.start_peers(1, fanout=1)
    parent = await stack.start_agent(fanout=2)
    children = [await stack.start_agent(fanout=0) for _ in range(3)]
    data = payload(MiB, seed=83)
    digest = await s3_origin.put(data)
    assert (await fetch(f"{parent}/pkg/{digest}")).received == (200, data)
    assert all(r == (200, data) for r in await storm(children, digest))
    assert sum((await uploads(children)).values()) == 0
    assert (await uploads([parent]))[parent] >= len(data)


# -- a lying agent ------------------------------------------------------------------


class LyingAgent:
    """A real server that joins a digest's tree like an agent, then serves
    wrong bytes (right length) to every agent sent to it."""

    def __init__(self, data: bytes) -> None:
        self.data = bytes(b ^ 0x5A for b in data[:64]) + data[64:]
        self.requests = 0
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/pkg/{digest}", self._serve)
        self.runner, self.url = await start_server(app, free_port())

    async def join(self, owner: str, digest: Digest) -> None:
        headers = {FORWARDED: "1", ADVERTISE: self.url, FANOUT: "2"}
        assert (await get(f"{owner}/blob/{digest}", **headers)).status == 200

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        start = int(request.headers.get("Range", "bytes=0-")[6:].split("-")[0] or 0)
        resp = web.StreamResponse(status=206 if start else 200)
        resp.content_length = len(self.data) - start
        if start:
            resp.headers["Content-Range"] = f"bytes {start}-{len(self.data) - 1}/{len(self.data)}"
        await resp.prepare(request)
        await resp.write(self.data[start:])
        return resp


async def test_a_lying_agent_is_refused_avoided_and_everyone_is_still_served_right(
    stack: Stack, s3_origin: OriginFixture
) -> None:
    await stack.start_peers(1, fanout=1)
    data = payload(2 * MiB, seed=84)
    digest = await s3_origin.put(data)
    liar = LyingAgent(data)
    await liar.start()
    try:
        await liar.join(stack.peers[0], digest)  # the owner's one slot: the liar
        agents = [await stack.start_agent(fanout=2) for _ in range(4)]
        results = await storm(agents, digest, attempts=4)
        assert all(r == (200, data) for r in results)
        assert liar.requests >= 1  # it was asked, and refused
        asked = liar.requests
        more = [await stack.start_agent(fanout=2) for _ in range(2)]
        assert all(r == (200, data) for r in await storm(more, digest))
        assert liar.requests == asked  # avoided: the tracker dropped it
        mismatches = [metric(await metrics_of(a), "cachesvc_digest_mismatch_total") for a in agents]
        assert sum(mismatches) >= 1
        assert s3_origin.origin_gets(digest) == 1
        for agent in agents + more:  # every agent kept it (kept means verified)
            core = stack.apps[agent][CORE]
            await core.flights.wait_idle()
            assert digest in core.store
    finally:
        await liar.runner.cleanup()


# -- parents that die or evict mid-stream ------------------------------------------


class MidStream(NamedTuple):
    parent: str
    child: str
    digest: Digest
    data: bytes
    child_get: asyncio.Future[Fetched]
    flight: Flight  # the child's fill


async def child_fed_by_parent(stack: Stack, s3_origin: OriginFixture, seed: int) -> MidStream:
    """A parent (paced, so it is mid-stream) holding a 6 MiB package and a
    child's GET of it under way through that parent."""
    await stack.start_peers(1, fanout=1)
    parent = await stack.start_agent(fanout=1, egress_limit=4 * MiB)
    child = await stack.start_agent(fanout=1)
    data = payload(6 * MiB, seed=seed)
    digest = await s3_origin.put(data)
    assert (await fetch(f"{parent}/pkg/{digest}")).received == (200, data)  # parent holds it
    child_get = asyncio.ensure_future(fetch(f"{child}/pkg/{digest}"))
    flight = await fill_under_way(stack, child, digest, lambda f: f.received > MiB)
    return MidStream(parent, child, digest, data, child_get, flight)


async def test_a_parent_killed_mid_stream_the_child_resumes_elsewhere(
    stack: Stack, s3_origin: OriginFixture
) -> None:
    parent, child, digest, data, child_get, flight = await child_fed_by_parent(stack, s3_origin, 85)
    assert flight.via == (parent,)
    await stack.kill(parent)
    assert (await asyncio.wait_for(child_get, 30)).received == (200, data)
    assert s3_origin.origin_gets(digest) == 1
    text = await metrics_of(child)
    assert metric(text, "cachesvc_upstream_fetches_total", upstream="agent", outcome="error") >= 1


async def test_a_killed_parent_with_slots_left_is_avoided_and_never_named_again(
    stack: Stack, s3_origin: OriginFixture
) -> None:
    """K=2: the dead parent still has a free slot in the owner's tree, so only
    the child's avoid list keeps the owner from naming it again (to this
    child's next ask and to every newcomer)."""
    await stack.start_peers(1, fanout=1)  # the owner's one slot: the parent
    owner = stack.peers[0]
    parent = await stack.start_agent(fanout=2, egress_limit=4 * MiB)
    child = await stack.start_agent(fanout=2)
    data = payload(6 * MiB, seed=91)
    digest = await s3_origin.put(data)
    assert (await fetch(f"{parent}/pkg/{digest}")).received == (200, data)
    child_get = asyncio.ensure_future(fetch(f"{child}/pkg/{digest}"))
    await fill_under_way(stack, child, digest, lambda f: f.via == (parent,) and f.received > MiB)
    await stack.kill(parent)
    assert (await asyncio.wait_for(child_get, 30)).received == (200, data)
    tracker = stack.apps[owner][CORE].tracker
    assert parent not in [m.url for m in tracker.members(digest)]  # dropped on the child's report
    assert metric(await metrics_of(owner), "cachesvc_fanout_redirects_total") == 1
    late = await stack.start_agent(fanout=2)
    assert (await fetch(f"{late}/pkg/{digest}")).received == (200, data)
    assert metric(await metrics_of(owner), "cachesvc_fanout_redirects_total") == 2  # to the child
    assert metric(await metrics_of(late), "cachesvc_upstream_fetches_total", outcome="error") == 0
    assert s3_origin.origin_gets(digest) == 1


async def test_a_parent_that_evicts_mid_stream_still_delivers_or_hands_over(
    stack: Stack, s3_origin: OriginFixture
) -> None:
    parent, _, digest, data, child_get, _ = await child_fed_by_parent(stack, s3_origin, 86)
    assert await stack.apps[parent][CORE].store.evict(digest)
    assert (await asyncio.wait_for(child_get, 30)).received == (200, data)
    assert s3_origin.origin_gets(digest) == 1
    # and the next agent is not sent to a parent that no longer has it for good
    late = await stack.start_agent(fanout=1)
    assert (await fetch(f"{late}/pkg/{digest}", attempts=2)).received == (200, data)


class DeadParentsOwner:
    """A real server in the owner's place that names a fresh dead parent (a
    free port nobody listens on) to every request that speaks fan-out, and
    serves the bytes itself to a request that does not."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.redirects = 0
        self.served = 0
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/blob/{digest}", self._blob)
        self.runner, self.url = await start_server(app, free_port())

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        if FANOUT in request.headers:
            self.redirects += 1
            dead = f"http://127.0.0.1:{free_port()}"
            digest = request.match_info["digest"]
            return web.Response(
                status=307, headers={"Location": f"{dead}/pkg/{digest}", PARENT: dead}
            )
        self.served += 1
        return web.Response(body=self.data, headers={"X-Cache-Tier": "L2"})


async def test_a_fill_tries_at_most_four_parents_then_the_owner_serves_it(
    stack: Stack, s3_origin: OriginFixture
) -> None:
    data = payload(MiB, seed=92)
    digest = await s3_origin.put(data)
    owner = DeadParentsOwner(data)
    await owner.start()
    try:
        agent = await stack.start_agent(peers=[owner.url], fanout=2)
        assert (await fetch(f"{agent}/pkg/{digest}")).received == (200, data)
        assert (owner.redirects, owner.served) == (MAX_PARENTS, 1)
        assert s3_origin.origin_gets(digest) == 0  # never the origin: the owner was asked
    finally:
        await owner.runner.cleanup()


# -- loops ----------------------------------------------------------------------------


async def test_a_host_refuses_to_feed_a_host_it_fetches_through(
    stack: Stack, s3_origin: OriginFixture
) -> None:
    """A from B from A: B is filling via A, so A's request to B is refused
    (two owners that disagree about the ring could otherwise pair them)."""
    await stack.start_peers(1, fanout=1)
    a = await stack.start_agent(fanout=1, egress_limit=2 * MiB)
    b = await stack.start_agent(fanout=1)
    data = payload(4 * MiB, seed=87)
    digest = await s3_origin.put(data)
    assert (await fetch(f"{a}/pkg/{digest}")).received == (200, data)
    b_get = asyncio.ensure_future(fetch(f"{b}/pkg/{digest}"))
    await fill_under_way(stack, b, digest, lambda f: f.via == (a,))
    headers = {FORWARDED: "1", ADVERTISE: a, FANOUT: "1"}
    status, answer = await get_json(f"{b}/pkg/{digest}", **headers)
    assert status == 409
    assert answer["error"] == "loop"
    assert (await asyncio.wait_for(b_get, 30)).received == (200, data)


async def test_a_host_asked_to_feed_itself_refuses_with_loop(
    stack: Stack, s3_origin: OriginFixture
) -> None:
    """An owner that names a host as its own parent (two owners that disagree
    about the tree) gets a 409 loop from it, not a feed."""
    await stack.start_peers(1, fanout=1)
    a = await stack.start_agent(fanout=1)
    data = payload(MiB, seed=93)
    digest = await s3_origin.put(data)
    assert (await fetch(f"{a}/pkg/{digest}")).received == (200, data)
    headers = {FORWARDED: "1", ADVERTISE: a, FANOUT: "1"}
    async with aiohttp.ClientSession() as s, s.get(f"{a}/pkg/{digest}", headers=headers) as r:
        assert (r.status, (await r.json())["error"]) == (409, "loop")


async def test_a_host_asked_for_what_it_neither_holds_nor_fills_says_not_here(
    stack: Stack, s3_origin: OriginFixture
) -> None:
    await stack.start_peers(1)
    agent = await stack.start_agent()
    digest = await s3_origin.put(payload(MiB, seed=88))
    status, answer = await get_json(f"{agent}/pkg/{digest}", **{FORWARDED: "1"})
    assert (status, answer["error"]) == (404, "not_here")
    assert s3_origin.origin_gets(digest) == 0  # a host's request never starts a fill


@pytest.mark.parametrize("limit", [1])
async def test_a_host_feeds_at_most_fanout_hosts_at_once(
    stack: Stack, s3_origin: OriginFixture, limit: int
) -> None:
    await stack.start_peers(1)
    agent = await stack.start_agent(fanout=limit, egress_limit=MiB)
    data = payload(2 * MiB, seed=89)
    digest = await s3_origin.put(data)
    assert (await fetch(f"{agent}/pkg/{digest}")).received == (200, data)
    headers = {FORWARDED: "1"}
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        first = await s.get(f"{agent}/pkg/{digest}", headers=headers)
        second = await s.get(f"{agent}/pkg/{digest}", headers=headers)
        assert (first.status, second.status) == (200, 503)
        assert (await second.json())["error"] == "fanout_busy"
        first.close()


# -- warm -------------------------------------------------------------------------------


async def test_warming_a_tenant_into_eight_agents_costs_the_owner_at_most_k_packages(
    stack: Stack, s3_origin: OriginFixture
) -> None:
    await stack.start_peers(1, fanout=2, egress_limit=32 * MiB)
    agents = [await stack.start_agent(fanout=2, token=TOKEN) for _ in range(8)]
    data = payload(3 * MiB, seed=90)
    digest = await s3_origin.put(data, "acme", "resize", "1")

    async def warm(agent: str) -> dict[str, Any]:
        job = (await post_json(f"{agent}/warm", {"tenant": "acme"}, token=TOKEN))[1]["job"]

        async def finished() -> dict[str, Any] | None:
            reply = await request("GET", f"{agent}/warm/{job}", token=TOKEN)
            state: dict[str, Any] = reply.json()
            return state if state["state"] != "running" else None

        return await eventually(finished, f"warm on {agent} finished", step=0.05)

    states = await asyncio.gather(*(warm(a) for a in agents))
    assert all(s["state"] == "done" and s["failed"] == 0 for s in states)
    owner = stack.peers[0]
    assert (await uploads([owner]))[owner] <= 2 * len(data)
    assert s3_origin.origin_gets(digest) == 1
    for agent in agents:
        assert digest in stack.apps[agent][CORE].store
