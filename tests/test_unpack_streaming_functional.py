"""Unpacking a package that is still arriving: the worker extracts while the
bytes come in, and the tree becomes visible only after the sha256 verdict.
Real agents on loopback over a real S3 server (moto) behind a proxy that can
trickle or corrupt the body."""

from __future__ import annotations

import asyncio
import io
import json
import os
import tarfile
import time
import zipfile

import aiohttp
import zstandard

from cachesvc.service import CORE
from tests.conftest import OriginFixture
from tests.servers import Stack

FILES = {f"lib/m{i}.bin": os.urandom(100_000) for i in range(30)}  # ~3 MB compressed


def trickle(origin: OriginFixture) -> None:
    """The blob body arrives in chunks 10 ms apart."""
    assert origin.proxy is not None
    origin.proxy.mode, origin.proxy.delay = "trickle", 0.01


def tar_zst(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return zstandard.ZstdCompressor(level=1).compress(buf.getvalue())


def plain_zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


async def post_unpack(agent: str, digest: object) -> tuple[int, dict[str, object]]:
    async with aiohttp.ClientSession() as s, s.post(f"{agent}/pkg/{digest}/unpack") as r:
        return r.status, json.loads(await r.read())


def code_entries(stack: Stack) -> list[str]:
    root = stack.root / "agent-0-code"
    return sorted(p.name for p in root.iterdir() if p.name != ".lock")


async def test_a_cold_tar_zst_is_extracted_while_it_arrives_and_shown_after_the_verdict(
    stack: Stack, s3_origin: OriginFixture
) -> None:
    agent = await stack.start_agent(peers=[])
    digest = await s3_origin.put(tar_zst(FILES))
    trickle(s3_origin)
    core = stack.apps[agent][CORE]
    unpack = asyncio.ensure_future(post_unpack(agent, digest))
    seen_during_fill: list[list[str]] = []
    for _ in range(400):  # while the fill runs: a worker, and no <hex>/ yet
        flight = core.flights.get(digest)
        if flight is not None and flight.received and not flight.verified:
            seen_during_fill.append(code_entries(stack))
        if unpack.done():
            break
        await asyncio.sleep(0.01)
    status, body = await asyncio.wait_for(unpack, 60)
    assert status == 200, body
    assert body["files"] == len(FILES) and body["layers"] == ["zstd", "tar"]
    assert seen_during_fill, "the fill was never seen running"
    assert all(digest.hex not in names for names in seen_during_fill)  # nothing unverified
    assert any(any(n.startswith(".tmp-") for n in names) for names in seen_during_fill)
    tree = stack.root / "agent-0-code" / digest.hex
    assert all((tree / name).read_bytes() == data for name, data in FILES.items())


async def test_wrong_bytes_arriving_leave_nothing_in_the_code_dir(
    stack: Stack, s3_origin: OriginFixture
) -> None:
    agent = await stack.start_agent(peers=[])
    digest = await s3_origin.put(tar_zst(FILES))
    s3_origin.proxy.mode = "corrupt"
    status, body = await post_unpack(agent, digest)
    assert status == 502 and body["error"] == "digest_mismatch", body
    assert code_entries(stack) == []
    s3_origin.proxy.mode = "ok"
    status, body = await post_unpack(agent, digest)  # the next try is served right
    assert status == 200 and body["files"] == len(FILES)


async def test_a_cold_zip_waits_for_its_end_and_unpacks(
    stack: Stack, s3_origin: OriginFixture
) -> None:
    agent = await stack.start_agent(peers=[])
    digest = await s3_origin.put(plain_zip(FILES))
    trickle(s3_origin)
    status, body = await asyncio.wait_for(post_unpack(agent, digest), 60)
    assert status == 200 and body["files"] == len(FILES) and body["layers"] == ["zip"]


async def test_a_hostile_tar_arriving_is_refused_before_it_has_all_arrived(
    stack: Stack, s3_origin: OriginFixture
) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        evil = tarfile.TarInfo("../../escape.txt")
        evil.size = 3
        tf.addfile(evil, io.BytesIO(b"bad"))
        for name, data in FILES.items():  # a long tail after the bad member
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    agent = await stack.start_agent(peers=[])
    digest = await s3_origin.put(buf.getvalue())
    trickle(s3_origin)
    core = stack.apps[agent][CORE]
    started = time.monotonic()
    status, body = await asyncio.wait_for(post_unpack(agent, digest), 60)
    assert status == 422 and body["error"] == "unsafe_archive", body
    flight = core.flights.get(digest)
    assert flight is not None and not flight.verified  # answered while still arriving
    assert time.monotonic() - started < 30
    assert code_entries(stack) == []
