"""Rot is never served: bytes read back from disk are verified before they are
trusted again. Real agents on loopback over a real S3 server (moto)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from cachesvc.config import Settings
from cachesvc.digest import Digest
from tests.conftest import OriginFixture, S3OriginFixture
from tests.http import fetch
from tests.servers import Stack, eventually, flip_byte, metric, metrics_of, payload

pytestmark = pytest.mark.slow  # every test takes over a second

MiB = 1 << 20


def blob_path(settings: Settings, digest: Digest) -> Path:
    return settings.cache_dir / "blobs" / "sha256" / digest.hex


async def agent_with_one_package(
    stack: Stack, origin: OriginFixture, size: int, **settings: object
) -> tuple[str, Digest, bytes]:
    agent = await stack.start_agent(peers=[], **settings)
    data = payload(size, seed=size)
    digest = await origin.put(data)
    assert (await fetch(f"{agent}/pkg/{digest}"))[2] == data
    return agent, digest, data


async def test_a_byte_flipped_while_stopped_is_never_served_and_is_refetched(
    stack: Stack, s3_origin: S3OriginFixture
) -> None:
    agent, digest, data = await agent_with_one_package(stack, s3_origin, 4 * MiB)
    await stack.restart(agent, lambda s: flip_byte(blob_path(s, digest), 3 * MiB))
    status, tier, body = await fetch(f"{agent}/pkg/{digest}")
    assert body != data or tier != "L1"
    assert body is None or body == data  # cut short, never a complete wrong body

    async def whole() -> bytes | None:  # the refill the mismatch started
        status, _, body = await fetch(f"{agent}/pkg/{digest}")
        return body if status == 200 else None

    assert await eventually(whole, "a whole body after the refill", step=0.05) == data
    assert s3_origin.origin_gets(digest) == 2
    assert metric(await metrics_of(agent), "cachesvc_digest_mismatch_total") >= 1


async def test_a_byte_flipped_in_the_last_block_is_caught_before_a_small_range_is_answered(
    stack: Stack, s3_origin: S3OriginFixture
) -> None:
    # a scrub this slow never reaches a verdict: the first serve finds the rot
    agent, digest, data = await agent_with_one_package(stack, s3_origin, 2 * MiB + 7, scrub_rate=1)
    await stack.restart(agent, lambda s: flip_byte(blob_path(s, digest), len(data) - 1))
    # the range ends at the verdict, and the verdict is bad; a small range is
    # gathered first, so nothing was answered yet: the request follows the refill
    status, tier, body = await fetch(f"{agent}/pkg/{digest}", Range="bytes=0-99")
    assert (status, tier, body) == (206, "ORIGIN", data[:100])
    text = await metrics_of(agent)
    assert metric(text, "cachesvc_corrupt_total", found_by="serve") == 1
    assert s3_origin.origin_gets(digest) == 2


async def test_good_entries_after_a_restart_are_served_from_l1_to_concurrent_readers(
    stack: Stack, s3_origin: S3OriginFixture
) -> None:
    agent, digest, data = await agent_with_one_package(stack, s3_origin, 3 * MiB)
    await stack.restart(agent)
    s3_origin.proxy.mode = "down"
    results = await asyncio.gather(*(fetch(f"{agent}/pkg/{digest}") for _ in range(8)))
    assert all(r == (200, "L1", data) for r in results)
    status, tier, body = await fetch(f"{agent}/pkg/{digest}", Range="bytes=10-19")
    assert (status, tier, body) == (206, "L1", data[10:20])
