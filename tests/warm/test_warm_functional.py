"""Warm jobs, pins, prefetch and the ``warm`` command end to end: real peers and
agents on loopback over a real S3 server (moto, behind a counting proxy); the
CLI runs as a subprocess against them."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from cachesvc.digest import Digest
from cachesvc.publish.upload import publish
from cachesvc.serve.service import CORE
from cachesvc.upstream.ring import Ring
from tests.conftest import OriginFixture
from tests.http import get, head, request
from tests.servers import Stack, eventually, metric, metrics_of, payload, start_fake_peer

pytestmark = pytest.mark.slow  # most tests take over a second

MiB = 1 << 20
TOKEN = "operator-s3cret"
ROOT = Path(__file__).resolve().parents[2]


async def tier_of(url: str) -> str:
    reply = await head(url)
    assert reply.status == 200
    return reply.headers["X-Cache-Tier"]


async def warm(url: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST /warm, then poll the job until it finishes (bounded)."""
    posted = await request("POST", f"{url}/warm", json=body, token=TOKEN)
    answer = posted.json()
    assert posted.status == 202, answer

    async def finished() -> dict[str, Any] | None:
        reply = await request("GET", f"{url}/warm/{answer['job']}", token=TOKEN)
        assert reply.status == 200
        job: dict[str, Any] = reply.json()
        return job if job["state"] != "running" else None

    return await eventually(finished, f"warm job {answer['job']} on {url} finished", step=0.05)


async def cli(*args: str, token: str = TOKEN) -> tuple[int, str, str]:
    env = {**os.environ, "CACHESVC_TOKEN": token}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cachesvc", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=ROOT,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def stored(stack: Stack, url: str) -> set[Digest]:
    return set(stack.apps[url][CORE].store.digests())


async def publish_tenant(
    fixture: OriginFixture,
    tenant: str,
    n: int,
    size: int = 4096,
    seed: int = 0,
    layers: list[Digest] | None = None,
) -> list[Digest]:
    """``n`` functions of one version each, through one origin client (fast seeding)."""
    origin = fixture.seeding_origin()
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"seed-{tenant}-{os.getpid()}"
    try:
        digests = []
        for i in range(n):
            tmp.write_bytes(payload(size, seed + i))
            published = await publish(origin, tmp, tenant, f"fn{i}", "v1", layers)
            digests.append(published.digest)
        return digests
    finally:
        tmp.unlink(missing_ok=True)
        await origin.close()


# -- L2 and L1 warm ----------------------------------------------------------------


async def test_warming_a_tenant_on_every_peer_puts_each_digest_on_its_owner_once(
    stack: Stack, s3_origin: OriginFixture
) -> None:
    peers = await stack.start_peers(3, token=TOKEN)
    digests = await publish_tenant(s3_origin, "acme", 20)

    jobs = await asyncio.gather(*(warm(p, {"tenant": "acme"}) for p in peers))

    ring = Ring(peers)
    for peer, job in zip(peers, jobs, strict=True):
        owned = {d for d in digests if ring.owner(d) == peer}
        assert job["state"] == "done" and job["total"] == 20
        assert (job["fetched"], job["skipped"], job["failed"]) == (len(owned), 20 - len(owned), 0)
        assert stored(stack, peer) == owned
    assert s3_origin.origin_gets() == 20
    text = "".join([await metrics_of(p) for p in peers])
    assert metric(text, "cachesvc_warm_items_total", outcome="fetched") == 20
    assert metric(text, "cachesvc_tenant_warm_items_total", tenant="acme") == 60
    assert metric(text, "cachesvc_prefetches_total", signal="warm") == 20


async def test_after_an_agent_warm_every_get_is_served_from_l1(
    stack: Stack, s3_origin: OriginFixture
) -> None:
    await stack.start_peers(3)
    agent = await stack.start_agent(token=TOKEN)
    layer = await s3_origin.put(payload(MiB, 99))
    digests = await publish_tenant(s3_origin, "shop", 5, 50_000, layers=[layer])

    job = await warm(agent, {"tenant": "shop"})

    assert (job["state"], job["total"], job["fetched"]) == ("done", 6, 6)
    assert job["bytes"] == 5 * 50_000 + MiB
    assert {i["tier"] for i in job["items"]} == {"L2"}
    for digest in [*digests, layer]:
        reply = await get(f"{agent}/pkg/{digest}")
        assert reply.status == 200 and reply.headers["X-Cache-Tier"] == "L1"
    again = await warm(agent, {"tenant": "shop"})
    assert (again["cached"], again["fetched"], again["bytes"]) == (6, 0, 0)


async def test_an_agent_warm_of_a_package_its_owner_peer_lies_about_follows_the_refill(
    stack: Stack, s3_origin: OriginFixture
) -> None:
    # Nothing of a warm goes out before the verdict: a refused peer costs the
    # item nothing but the walk to the next source (here the origin).
    data = payload(40_000, seed=23)
    digest = await s3_origin.put(data)
    runner, liar = await start_fake_peer("corrupt", {digest.hex: data})
    try:
        agent = await stack.start_agent(peers=[liar], token=TOKEN)
        job = await warm(agent, {"digests": [str(digest)]})
        assert (job["state"], job["fetched"], job["failed"]) == ("done", 1, 0), job
        assert job["items"][0]["tier"] == "ORIGIN"
        assert stored(stack, agent) == {digest}
        assert metric(await metrics_of(agent), "cachesvc_digest_mismatch_total") == 1
    finally:
        await runner.cleanup()


# -- the operator API's edges ---------------------------------------------------------


async def test_the_operator_api_needs_the_right_token(
    stack: Stack, s3_origin: OriginFixture
) -> None:
    agent = await stack.start_agent(peers=[], token=TOKEN)
    for token in (None, "wrong"):
        for method, path in (("POST", "/warm"), ("GET", "/warm/abc"), ("POST", "/warm/unpin")):
            reply = await request(method, agent + path, json={"tenant": "t"}, token=token)
            refused = (reply.status, reply.json()["error"])
            assert refused == (401, "unauthorized"), (method, path, token)

    open_agent = await stack.start_agent(peers=[])
    reply = await request("POST", f"{open_agent}/warm", json={"tenant": "t"}, token=TOKEN)
    assert reply.status == 401 and "disabled" in reply.json()["detail"]


async def test_bad_bodies_and_names_are_400(stack: Stack) -> None:
    agent = await stack.start_agent(peers=[], token=TOKEN)
    cases: list[tuple[Any, str]] = [
        ({"tenant": "../etc"}, "invalid_request"),
        ({"tenant": "has space"}, "invalid_request"),
        ({"tenant": 7}, "invalid_request"),
        ({}, "invalid_request"),
        ({"digests": []}, "invalid_request"),
        ({"digests": "sha256:ab"}, "invalid_request"),
        ({"tenant": "t", "colour": "red"}, "invalid_request"),
        ({"tenant": "t", "pin": "yes"}, "invalid_request"),
        ([1, 2], "invalid_request"),
        ({"digests": ["sha256:" + "A" * 64]}, "invalid_digest"),
        ({"digests": ["a" * 63]}, "invalid_digest"),
    ]
    for body, code in cases:
        reply = await request("POST", f"{agent}/warm", json=body, token=TOKEN)
        assert (reply.status, reply.json()["error"]) == (400, code), body
    reply = await request("POST", f"{agent}/warm", data="{not json", token=TOKEN)
    assert (reply.status, reply.json()["error"]) == (400, "invalid_request")
    reply = await request("GET", f"{agent}/warm/abc?items=some", token=TOKEN)
    assert reply.status == 400


async def test_unknown_tenants_and_jobs_are_404(stack: Stack, s3_origin: OriginFixture) -> None:
    await s3_origin.put(b"x" * 10, "someone", "f", "v1")
    agent = await stack.start_agent(peers=[], token=TOKEN)
    reply = await request("POST", f"{agent}/warm", json={"tenant": "nobody"}, token=TOKEN)
    assert (reply.status, reply.json()["error"]) == (404, "unknown_tenant")
    reply = await request("GET", f"{agent}/warm/0123456789abcdef", token=TOKEN)
    assert (reply.status, reply.json()["error"]) == (404, "not_found")


# -- pins ------------------------------------------------------------------------------


async def test_pinned_packages_survive_a_cache_flood_and_unpin_releases_them(
    stack: Stack, s3_origin: OriginFixture
) -> None:
    agent = await stack.start_agent(peers=[], token=TOKEN, cache_size=5 * MiB, pin_share=0.5)
    pinned = [await s3_origin.put(payload(MiB, 50 + i), "vip", f"fn{i}", "v1") for i in range(2)]

    async def flood(seed: int) -> None:
        for digest in await publish_tenant(s3_origin, f"flood{seed}", 8, MiB, seed):
            assert (await get(f"{agent}/pkg/{digest}")).status == 200

    job = await warm(agent, {"tenant": "vip", "pin": True})
    assert job["state"] == "done" and all(i["pinned"] for i in job["items"])
    await flood(1000)
    assert [await tier_of(f"{agent}/pkg/{d}") for d in pinned] == ["L1", "L1"]
    assert (await get(f"{agent}/stats")).json()["pinned_bytes"] == 2 * MiB

    reply = await request("POST", f"{agent}/warm/unpin", json={"tenant": "vip"}, token=TOKEN)
    assert (reply.status, reply.json()) == (200, {"unpinned": 2, "total": 2})
    await flood(2000)
    assert "L1" not in [await tier_of(f"{agent}/pkg/{d}") for d in pinned]


# -- prefetch along calls ----------------------------------------------------------------


async def test_serving_a_caller_prefetches_the_called_functions_current_package(
    stack: Stack, s3_origin: OriginFixture
) -> None:
    await stack.start_peers(2)
    caller = await s3_origin.put(payload(10_000, 1), "app", "api", "v1", calls=["worker"])
    old = await s3_origin.put(payload(20_000, 2), "app", "worker", "v9")
    current = await s3_origin.put(payload(30_000, 3), "app", "worker", "v10")
    agent = await stack.start_agent()

    async def listed() -> bool:  # the agent lists tenants/ once at start
        return metric(await metrics_of(agent), "cachesvc_references") == 3

    await eventually(listed, "the references listed")

    for _ in range(3):
        assert (await get(f"{agent}/pkg/{caller}")).status == 200

    async def prefetched() -> bool:
        return await tier_of(f"{agent}/pkg/{current}") == "L1"

    await eventually(prefetched, "the called package prefetched")
    assert await tier_of(f"{agent}/pkg/{old}") != "L1"
    text = await metrics_of(agent)
    assert metric(text, "cachesvc_prefetches_total", signal="calls") == 1


# -- the command line ------------------------------------------------------------------


async def test_cli_warm_of_an_agent_prints_a_summary_and_fails_on_a_missing_package(
    stack: Stack, s3_origin: OriginFixture
) -> None:
    await stack.start_peers(1)
    agent = await stack.start_agent(token=TOKEN)
    await publish_tenant(s3_origin, "cli", 4)

    code, out, err = await cli("warm", "--tenant", "cli", "--agent", agent)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == [
        "target", "state", "fetched", "cached", "not", "owner", "failed", "bytes", "time",
    ]  # fmt: skip
    assert lines[1].split()[:6] == [agent, "done", "4", "0", "0", "0"]
    assert lines[2].split()[:2] == ["total", "ok"]
    assert "warm [" in err and "4/4 items" in err  # progress as plain lines (not a TTY)

    missing = "sha256:" + "0" * 64
    code, out, err = await cli("warm", "--tenant", "cli", "--digest", missing, "--agent", agent)
    assert code == 1
    assert out.splitlines()[1].split()[:6] == [agent, "failed", "0", "4", "0", "1"]
    assert f"{missing}: NotFound" in out

    code, out, _ = await cli("warm", "--tenant", "cli", "--agent", agent, token="wrong")
    assert code == 1 and "401 unauthorized" in out


async def test_cli_warm_of_the_l2_tier_with_a_dead_peer_reports_it_and_warms_the_rest(
    stack: Stack, s3_origin: OriginFixture
) -> None:
    peers = await stack.start_peers(3, token=TOKEN)
    digests = await publish_tenant(s3_origin, "big", 12)
    dead = peers[1]
    await stack.stop(dead)

    code, out, err = await cli("warm", "--tenant", "big", "--peers", ",".join(peers))

    assert code == 1
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:5]}
    assert rows[dead][1] == "unreachable"
    assert rows["total"][1] == "FAILED"
    assert f"{dead}: POST {dead}/warm: ClientConnectorError" in out
    ring = Ring(peers)
    for peer in (peers[0], peers[2]):
        owned = {d for d in digests if ring.owner(d) == peer}
        assert rows[peer][1:3] == ["done", str(len(owned))]
        assert stored(stack, peer) == owned
    assert s3_origin.origin_gets() == sum(1 for d in digests if ring.owner(d) != dead)


async def test_publish_with_warm_fills_the_owner_before_traffic_moves(
    stack: Stack, s3_origin: OriginFixture, tmp_path: Path
) -> None:
    peers = await stack.start_peers(3, token=TOKEN)
    package = tmp_path / "app.zip"
    package.write_bytes(payload(200_000, 7))

    code, out, err = await cli(
        "publish", str(package), "--tenant", "pub", "--function", "api", "--version", "v2",
        "--origin", s3_origin.url, "--s3-endpoint", s3_origin.direct_endpoint or "",
        "--warm", "--peers", ",".join(peers),
    )  # fmt: skip

    assert code == 0, err
    digest = Digest.parse(out.strip())
    owner = Ring(peers).owner(digest)
    assert owner is not None
    assert [p for p in peers if digest in stored(stack, p)] == [owner]
    text = await metrics_of(owner)
    assert metric(text, "cachesvc_prefetches_total", signal="publish") == 1
    assert "total" in err and "ok" in err
