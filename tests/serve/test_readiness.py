"""Readiness over a real ``file://`` origin and a real store directory: what makes
a service not ready, and the origin check's cache (an injected clock)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from cachesvc.serve.readiness import OriginCheck, Readiness
from cachesvc.upstream.origin import FileOrigin
from tests.clock import Clock


def readiness_over(tmp_path: Path, root: Path, clock: Clock) -> tuple[Readiness, OriginCheck]:
    store_tmp = tmp_path / "store" / "tmp"
    store_tmp.mkdir(parents=True, exist_ok=True)
    check = OriginCheck(FileOrigin(root), ttl=10.0, wait=30.0, clock=clock)
    return Readiness(store_tmp, check), check


async def test_a_missing_origin_dir_is_not_ready_until_it_exists_and_the_verdict_expires(
    tmp_path: Path,
) -> None:
    root, clock = tmp_path / "origin", Clock(0.0)
    readiness, check = readiness_over(tmp_path, root, clock)

    status, body = await readiness.report()
    reason = f"origin file://{root}: cannot list {root}: No such file or directory"
    assert (status, body["status"], body["reason"]) == (503, "not_ready", reason)
    assert (body["error"], body["detail"]) == ("not_ready", reason)  # the contract's keys too

    root.mkdir()
    clock.now = 9.9  # within the TTL: the cached verdict, the origin not asked again
    assert (await readiness.report())[0] == 503
    assert check.checks == 1

    clock.now = 10.0
    assert await readiness.report() == (200, {"status": "ready", "origin": "ok"})
    assert check.checks == 2
    await readiness.close()


async def test_an_origin_path_that_is_a_file_is_not_ready(tmp_path: Path) -> None:
    root = tmp_path / "origin"
    root.write_text("not a directory")
    readiness, _ = readiness_over(tmp_path, root, Clock(0.0))

    status, body = await readiness.report()

    assert status == 503 and body["reason"].endswith(f"cannot list {root}: Not a directory")


async def test_concurrent_probes_share_one_origin_check(tmp_path: Path) -> None:
    root = tmp_path / "origin"
    root.mkdir()
    readiness, check = readiness_over(tmp_path, root, Clock(0.0))

    reports = await asyncio.gather(*(readiness.report() for _ in range(50)))

    assert {status for status, _ in reports} == {200}
    assert check.checks == 1


async def test_a_store_that_takes_no_write_is_not_ready_whatever_the_origin(
    tmp_path: Path,
) -> None:
    root = tmp_path / "origin"
    root.mkdir()
    check = OriginCheck(FileOrigin(root), clock=Clock(0.0))
    readiness = Readiness(tmp_path / "gone" / "tmp", check)

    status, body = await readiness.report()

    assert status == 503 and body["reason"].startswith("store not writable: ")
    assert "No such file or directory" in body["reason"]
    assert check.checks == 0  # the local check failed first: the origin was not asked
