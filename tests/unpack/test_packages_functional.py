"""Package endpoints through a real agent: /archive and /unpack."""

from __future__ import annotations

import asyncio
import io
import json
import os
import tarfile
from pathlib import Path

import pytest
import zstandard

from tests.archives import make_zip
from tests.conftest import OriginFixture
from tests.http import request
from tests.servers import Stack, eventually, payload

pytestmark = pytest.mark.slow  # most tests take over a second

FILES = {"handler.py": b"def handler(e, c):\n    return 1\n", "lib/data.bin": payload(200_000)}


def evil_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("../../escape.txt")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"bad"))
    return buf.getvalue()


async def test_archive_peels_layers_and_names_them(stack: Stack, s3_origin: OriginFixture) -> None:
    agent = await stack.start_agent(peers=[])
    inner = make_zip(FILES)
    digest = await s3_origin.put(zstandard.ZstdCompressor().compress(inner))
    status, headers, body = await request("GET", f"{agent}/pkg/{digest}/archive")
    assert status == 200 and body == inner
    assert headers["X-Package-Layers"] == "zstd,zip"


async def test_unpack_extracts_once_and_answers_repeats_at_once(
    stack: Stack, s3_origin: OriginFixture
) -> None:
    agent = await stack.start_agent(peers=[])
    digest = await s3_origin.put(zstandard.ZstdCompressor().compress(make_zip(FILES)))
    results = await asyncio.gather(
        *(request("POST", f"{agent}/pkg/{digest}/unpack") for _ in range(8))
    )
    assert {r[0] for r in results} == {200}
    body = json.loads(results[0][2])
    assert body["digest"] == str(digest) and body["layers"] == ["zstd", "zip"]
    assert body["files"] >= 2 and body["bytes"] == sum(len(v) for v in FILES.values())
    tree = Path(body["path"])
    assert tree == stack.root / "agent-0-code" / digest.hex
    for name, data in FILES.items():
        assert (tree / name).read_bytes() == data
    assert all(json.loads(r[2]) == body for r in results)
    assert s3_origin.origin_gets(digest) == 1


async def test_a_hostile_archive_is_refused_and_leaves_nothing(
    stack: Stack, s3_origin: OriginFixture
) -> None:
    agent = await stack.start_agent(peers=[])
    digest = await s3_origin.put(evil_tar())
    status, _, body = await request("POST", f"{agent}/pkg/{digest}/unpack")
    assert status == 422 and b'"unsafe_archive"' in body
    assert stack.code_entries() == set()
    assert not (stack.root / "escape.txt").exists()


async def test_an_unknown_format_is_422_unsupported_format(
    stack: Stack, s3_origin: OriginFixture
) -> None:
    agent = await stack.start_agent(peers=[])
    digest = await s3_origin.put(b"#!/bin/sh\necho not an archive\n" * 100)
    for method, path in (("POST", "unpack"), ("GET", "archive")):
        status, _, body = await request(method, f"{agent}/pkg/{digest}/{path}")
        assert status == 422 and b'"unsupported_format"' in body


async def test_a_package_over_the_limit_is_413_before_any_download(
    stack: Stack, s3_origin: OriginFixture
) -> None:
    agent = await stack.start_agent(peers=[], max_package_size=100_000)
    digest = await s3_origin.put(make_zip({"big.bin": os.urandom(300_000)}))
    status, _, body = await request("POST", f"{agent}/pkg/{digest}/unpack")
    assert status == 413 and b'"too_large"' in body
    assert s3_origin.origin_gets(digest) == 0


async def test_eviction_takes_the_unpacked_tree_with_the_package(
    stack: Stack, s3_origin: OriginFixture
) -> None:
    agent = await stack.start_agent(peers=[], cache_size=1_000_000)
    first = await s3_origin.put(make_zip({"a.bin": os.urandom(400_000)}))
    assert (await request("POST", f"{agent}/pkg/{first}/unpack"))[0] == 200
    assert first.hex in stack.code_entries()
    for _ in range(3):
        d = await s3_origin.put(make_zip({"b.bin": os.urandom(400_000)}))
        assert (await request("GET", f"{agent}/pkg/{d}"))[0] == 200
    await eventually(lambda: first.hex not in stack.code_entries(), "the tree evicted")


async def test_unpack_without_a_code_dir_is_a_clear_400(
    stack: Stack, s3_origin: OriginFixture
) -> None:
    agent = await stack.start_agent(peers=[], code_dir=None)
    digest = await s3_origin.put(make_zip(FILES))
    status, _, body = await request("POST", f"{agent}/pkg/{digest}/unpack")
    assert status == 400 and b"--code-dir" in body
