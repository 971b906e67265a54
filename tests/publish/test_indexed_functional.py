"""An indexed package through a real agent on loopback: the agent's existing
``unpack`` extracts it, and ranged GETs of the package, as a lazy reader will
make them, give back the index and any one chunk, verified alone."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from cachesvc.unpack.chunks import Window, read_index, verify_chunk
from cachesvc.unpack.codec import Limits
from tests.archives import tree_with_times
from tests.conftest import OriginFixture
from tests.indexes import FILES, build
from tests.servers import Stack

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]  # a real agent and origin


async def ranged(session: aiohttp.ClientSession, url: str, start: int, length: int) -> bytes:
    headers = {"Range": f"bytes={start}-{start + length - 1}"}
    async with session.get(url, headers=headers) as resp:
        assert resp.status == 206
        return await resp.read()


async def test_the_agent_unpacks_an_indexed_package_like_any_tar_zst(
    file_stack: Stack, file_origin: OriginFixture, tmp_path: Path
) -> None:
    package, _ = build(tmp_path)
    agent = await file_stack.start_agent(peers=[])
    digest = await file_origin.put(package)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{agent}/pkg/{digest}/unpack") as resp:
            assert resp.status == 200, await resp.text()
            doc = await resp.json()
    assert doc["layers"] == ["zstd", "tar"]
    tree = tree_with_times(Path(doc["path"]))
    assert {name: data for name, (data, _, _) in tree.items()} == FILES


async def test_the_index_and_one_chunk_come_verified_from_ranged_gets(
    file_stack: Stack, file_origin: OriginFixture, tmp_path: Path
) -> None:
    package, ref = build(tmp_path)
    agent = await file_stack.start_agent(peers=[])
    url = f"{agent}/pkg/{await file_origin.put(package)}"
    size = len(package)
    async with aiohttp.ClientSession() as session:
        start = size - ref.tail
        tail = Window(await ranged(session, url, start, ref.tail), start)
        index = read_index(tail, size, ref, Limits())
        big = index.entry("lib/sub/data.bin")
        assert big is not None
        chunk = big.chunks[1]
        frame = await ranged(session, url, chunk.offset, chunk.length)
    expected = FILES["lib/sub/data.bin"][chunk.start : chunk.start + chunk.size]
    assert verify_chunk(big, chunk, frame) == expected
