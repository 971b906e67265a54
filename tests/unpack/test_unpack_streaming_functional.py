"""Unpacking a package that is still arriving: the worker extracts while the
bytes come in, and the tree becomes visible only after the sha256 verdict.
Real agents on loopback over a real S3 server (moto) behind a proxy that can
hold back or corrupt the body."""

from __future__ import annotations

import asyncio
import io
import os
import tarfile
import time
import zipfile
from collections.abc import Callable

import pytest
import zstandard

from cachesvc.digest import Digest
from cachesvc.serve.service import CORE
from node_agent.packages import UNPACKER
from tests.archives import make_zip
from tests.conftest import OriginFixture, S3OriginFixture
from tests.http import post_json
from tests.servers import Stack, eventually

pytestmark = pytest.mark.slow  # most tests take over a second

FILES = {f"lib/m{i}.bin": os.urandom(100_000) for i in range(30)}  # ~3 MB compressed


def hold(origin: OriginFixture) -> None:
    """Blob bodies stop half-way until ``origin.proxy.release()``."""
    assert origin.proxy is not None
    origin.proxy.mode = "hold"


async def while_held(origin: OriginFixture, seen: Callable[[], bool], what: str) -> None:
    """Wait until ``seen`` holds while the body is held half-way; then let the
    rest of the body go (also when it never held)."""
    assert origin.proxy is not None
    try:
        await eventually(seen, what, timeout=60, step=0.01)
    finally:
        origin.proxy.release()


def tar_zst(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return zstandard.ZstdCompressor(level=1).compress(buf.getvalue())


async def refused(stack: Stack, agent: str, digest: Digest, status: int, code: str) -> None:
    """A cold unpack of ``digest`` answers ``status``/``code`` and leaves nothing."""
    got, body = await post_json(f"{agent}/pkg/{digest}/unpack")
    assert got == status and body["error"] == code, body
    assert stack.code_entries() == set()


async def test_a_cold_tar_zst_is_extracted_while_it_arrives_and_shown_after_the_verdict(
    stack: Stack, s3_origin: S3OriginFixture
) -> None:
    agent = await stack.start_agent(peers=[])
    digest = await s3_origin.put(tar_zst(FILES))
    hold(s3_origin)
    core = stack.apps[agent][CORE]
    unpack = asyncio.ensure_future(post_json(f"{agent}/pkg/{digest}/unpack"))
    seen_during_fill: list[set[str]] = []

    def a_temp_tree_while_unverified() -> bool:
        flight = core.flights.get(digest)
        if flight is None or not flight.received or flight.verified:
            return False
        seen_during_fill.append(stack.code_entries())
        return any(n.startswith(".tmp-") for n in seen_during_fill[-1])

    await while_held(s3_origin, a_temp_tree_while_unverified, "a temp tree during the fill")
    assert all(digest.hex not in names for names in seen_during_fill)  # nothing unverified
    status, body = await asyncio.wait_for(unpack, 60)
    assert status == 200, body
    assert body["files"] == len(FILES) and body["layers"] == ["zstd", "tar"]
    tree = stack.root / "agent-0-code" / digest.hex
    assert all((tree / name).read_bytes() == data for name, data in FILES.items())


async def test_wrong_bytes_arriving_leave_nothing_in_the_code_dir(
    stack: Stack, s3_origin: S3OriginFixture
) -> None:
    agent = await stack.start_agent(peers=[])
    digest = await s3_origin.put(tar_zst(FILES))
    s3_origin.proxy.mode = "corrupt"
    await refused(stack, agent, digest, 502, "digest_mismatch")
    s3_origin.proxy.mode = "ok"
    status, body = await post_json(f"{agent}/pkg/{digest}/unpack")  # the next try is served right
    assert status == 200 and body["files"] == len(FILES)


async def test_a_cold_zip_is_extracted_while_it_arrives_then_checked_by_its_directory(
    stack: Stack, s3_origin: S3OriginFixture
) -> None:
    agent = await stack.start_agent(peers=[])
    digest = await s3_origin.put(make_zip(FILES, zipfile.ZIP_STORED))
    hold(s3_origin)
    core = stack.apps[agent][CORE]
    unpack = asyncio.ensure_future(post_json(f"{agent}/pkg/{digest}/unpack"))

    def members_written_while_unverified() -> bool:
        flight = core.flights.get(digest)
        if flight is None or not flight.received or flight.verified:
            return False
        return any((stack.root / "agent-0-code").glob(".tmp-*/lib/*"))

    # members are written before the rest of the body (and the directory) arrives
    await while_held(s3_origin, members_written_while_unverified, "members during the fill")
    status, body = await asyncio.wait_for(unpack, 60)
    assert status == 200 and body["files"] == len(FILES) and body["layers"] == ["zip"]
    tree = stack.root / "agent-0-code" / digest.hex
    assert all((tree / name).read_bytes() == data for name, data in FILES.items())


def zip_with(entries: list[tuple[zipfile.ZipInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for info, data in entries:
            zf.writestr(info, data)
    return buf.getvalue()


async def test_a_zip_whose_local_headers_lie_is_judged_by_its_directory(
    stack: Stack, s3_origin: S3OriginFixture
) -> None:
    agent = await stack.start_agent(peers=[])
    honest = zip_with([(zipfile.ZipInfo("app/handler.py"), b"print(1)\n" * 100)])
    lying = honest.replace(b"app/handler.py", b"app/hacker.py!", 1)  # the local header only
    assert lying != honest and lying.count(b"app/handler.py") == 1
    digest = await s3_origin.put(lying)
    await refused(stack, agent, digest, 422, "unsupported_format")


async def test_a_link_only_the_directory_shows_is_refused_and_leaves_nothing(
    stack: Stack, s3_origin: S3OriginFixture
) -> None:
    agent = await stack.start_agent(peers=[])
    link = zipfile.ZipInfo("app/passwd")
    link.external_attr = 0o120777 << 16  # a symlink: only the directory says so
    digest = await s3_origin.put(zip_with([(link, b"/etc/passwd")]))
    await refused(stack, agent, digest, 422, "unsafe_archive")


async def test_modes_and_times_come_from_the_directory(
    stack: Stack, s3_origin: S3OriginFixture
) -> None:
    agent = await stack.start_agent(peers=[])
    tool = zipfile.ZipInfo("bin/tool", date_time=(2020, 5, 17, 10, 30, 0))
    tool.external_attr = 0o100755 << 16
    plain = zipfile.ZipInfo("lib/data.txt", date_time=(2019, 1, 2, 3, 4, 6))
    digest = await s3_origin.put(zip_with([(tool, b"#!/bin/sh\n"), (plain, b"x" * 1000)]))
    status, body = await post_json(f"{agent}/pkg/{digest}/unpack")
    assert status == 200, body
    tree = stack.root / "agent-0-code" / digest.hex
    assert os.stat(tree / "bin/tool").st_mode & 0o777 == 0o755
    assert os.stat(tree / "lib/data.txt").st_mode & 0o777 == 0o644
    expected = time.mktime((2020, 5, 17, 10, 30, 0, 0, 0, -1))
    assert os.stat(tree / "bin/tool").st_mtime == expected


async def test_a_hostile_tar_arriving_is_refused_once_its_bytes_are_verified(
    stack: Stack, s3_origin: S3OriginFixture
) -> None:
    """The worker refuses the bad member while the rest is held at the origin;
    the answer waits for the verdict (the refusal is the package's only if the
    bytes are), and leaves nothing."""
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
    hold(s3_origin)
    workers = stack.apps[agent][UNPACKER].workers
    answer = asyncio.ensure_future(post_json(f"{agent}/pkg/{digest}/unpack"))
    try:
        await eventually(lambda: workers.started == 1 and not workers.pids(), "the worker refused")
        assert not answer.done()  # the body is still held: no verdict, no answer
    finally:
        s3_origin.proxy.release()
    status, body = await asyncio.wait_for(answer, 30)
    assert status == 422 and body["error"] == "unsafe_archive", body
    flight = stack.apps[agent][CORE].flights.get(digest)
    assert flight is None or flight.verified
    assert stack.code_entries() == set()


async def test_a_worker_whose_fetch_fails_is_killed_and_reaped_before_the_error(
    stack: Stack, s3_origin: S3OriginFixture, caplog: pytest.LogCaptureFixture
) -> None:
    """The body is cut while the worker waits for more: the worker has exited
    when the fetch's failure is answered (the tree under it is then removed)."""
    agent = await stack.start_agent(peers=[])
    digest = await s3_origin.put(tar_zst(FILES))
    hold(s3_origin)
    workers = stack.apps[agent][UNPACKER].workers
    answer = asyncio.ensure_future(post_json(f"{agent}/pkg/{digest}/unpack"))
    try:
        await eventually(workers.pids, "a worker reading the held body", step=0.01)
        s3_origin.proxy.mode = "truncate"
    finally:
        s3_origin.proxy.release()
    status, body = await asyncio.wait_for(answer, 30)
    assert status == 502, body
    assert not [r for r in caplog.records if "did not exit" in r.getMessage()]
    assert stack.code_entries() == set()


async def test_a_refusal_waits_for_the_verdict_only_within_one_unpack_budget(
    stack: Stack, s3_origin: S3OriginFixture
) -> None:
    """The worker uses its whole budget waiting for held bytes (413); the
    verdict, still held, is not waited for a second budget."""
    budget = 3.0
    agent = await stack.start_agent(peers=[], unpack_timeout=budget)
    digest = await s3_origin.put(tar_zst(FILES))
    hold(s3_origin)
    workers = stack.apps[agent][UNPACKER].workers
    answer = asyncio.ensure_future(post_json(f"{agent}/pkg/{digest}/unpack"))
    try:
        await eventually(workers.pids, "a worker reading the held body", step=0.01)
        status, body = await asyncio.wait_for(answer, 1.6 * budget)  # two budgets before
    finally:
        s3_origin.proxy.release()
    assert status == 413 and "took over" in body["detail"], body
    assert stack.code_entries() == set()
