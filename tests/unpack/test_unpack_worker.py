"""Unpack workers: each package in its own process, under limits, killed at its budget."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cachesvc.errors import (
    CachesvcError,
    Overloaded,
    TooLarge,
    UnsafeArchive,
    UnsupportedFormat,
)
from cachesvc.unpack.codec import Limits
from cachesvc.unpack.extract import Extracted
from cachesvc.unpack.unpacker import Unpacker
from cachesvc.unpack.worker import Budget, Workers, _decode
from tests import hostile
from tests.archives import FILES, expected_modes, stored_package, tar_of, tree_of, wrap
from tests.servers import eventually
from tests.workers import job, running_pid

REPO = Path(__file__).resolve().parents[2]


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_a_package_that_keeps_the_parser_busy_is_killed_at_its_budget(
    tmp_path: Path,
) -> None:
    workers = Workers(1, Budget(timeout=1.0))
    package, dest = job(tmp_path, hostile.digit_bomb())  # minutes of CPU if left alone
    started = time.monotonic()
    try:
        attempt = asyncio.ensure_future(workers.extract(package, dest, Limits()))
        pid = await running_pid(workers)
        with pytest.raises(TooLarge, match=r"took over 1 s \(--unpack-timeout\)"):
            await attempt
    finally:
        await workers.aclose()
    assert time.monotonic() - started < 60  # the bomb alone needs 160 s or more
    assert gone(pid)


async def test_the_worker_runs_under_its_limits_and_at_a_lower_priority(tmp_path: Path) -> None:
    budget, limits = Budget(timeout=30, memory=768 * 2**20), Limits(max_unpacked_size=2**30)
    workers = Workers(1, budget)
    package, dest = job(tmp_path, hostile.digit_bomb())
    try:
        attempt = asyncio.ensure_future(workers.extract(package, dest, limits))
        pid = await running_pid(workers)

        def confined() -> list[str] | None:  # it confines itself before reading
            rows = Path(f"/proc/{pid}/limits").read_text().splitlines()
            return None if "unlimited" in next(r for r in rows if "cpu time" in r) else rows

        rows = await eventually(confined, "the worker confined itself", step=0.01)
        nice = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])
    finally:
        await workers.aclose()
    with pytest.raises(Overloaded, match="shutting down"):
        await attempt
    found = {row[:26].strip(): row[26:].split()[:2] for row in rows[1:]}
    assert found["Max address space"] == [str(budget.memory)] * 2
    assert found["Max cpu time"] == [str(budget.cpu_seconds), str(budget.cpu_seconds + 1)]
    assert found["Max file size"] == [str(limits.max_decoded_size)] * 2
    assert found["Max open files"] == ["64", "64"]
    assert found["Max core file size"] == ["0", "0"]
    assert nice == min(19, os.nice(0) + 10)


async def test_an_xz_that_wants_a_4_gib_dictionary_is_over_the_memory_budget(
    tmp_path: Path,
) -> None:
    workers = Workers(1, Budget(timeout=60, memory=2**30))
    package, dest = job(tmp_path, hostile.xz_with_a_4_gib_dictionary(tar_of()))
    try:
        with pytest.raises(TooLarge, match="memory"):
            await workers.extract(package, dest, Limits())
    finally:
        await workers.aclose()


@pytest.mark.parametrize(
    ("sig", "error", "detail"),
    [
        (signal.SIGSEGV, UnsupportedFormat, "crashed on this package (SIGSEGV)"),
        (signal.SIGXCPU, TooLarge, "of CPU"),
        (signal.SIGKILL, TooLarge, "killed"),  # the OOM killer, say: not our timeout
    ],
)
async def test_a_worker_killed_by_a_signal_is_answered_with_a_contract_error(
    tmp_path: Path, sig: signal.Signals, error: type[CachesvcError], detail: str
) -> None:
    workers = Workers(1, Budget(timeout=60))
    package, dest = job(tmp_path, hostile.digit_bomb())
    try:
        attempt = asyncio.ensure_future(workers.extract(package, dest, Limits()))
        os.kill(await running_pid(workers), sig)
        with pytest.raises(error, match=detail.replace("(", r"\(").replace(")", r"\)")):
            await attempt
    finally:
        await workers.aclose()


async def test_callers_beyond_the_queue_are_overloaded_and_aclose_answers_the_rest(
    tmp_path: Path,
) -> None:
    workers = Workers(1, Budget(timeout=60), queue=1)
    running = asyncio.ensure_future(
        workers.extract(*job(tmp_path, hostile.digit_bomb(), "a"), Limits())
    )
    await running_pid(workers)
    waiting = asyncio.ensure_future(
        workers.extract(*job(tmp_path, hostile.digit_bomb(), "b"), Limits())
    )
    await asyncio.sleep(0)
    with pytest.raises(Overloaded, match="already waiting"):
        await workers.extract(*job(tmp_path, tar_of(), "c"), Limits())
    await workers.aclose()
    for attempt in (running, waiting):
        with pytest.raises(Overloaded, match="shutting down"):
            await attempt


async def test_unpacking_never_waits_for_the_default_thread_pool(
    tmp_path: Path,
) -> None:
    """Store I/O and fills run on the default pool: a full pool must not stop an
    unpack, and unpacks must not fill it."""
    loop = asyncio.get_running_loop()
    release = threading.Event()
    loop.set_default_executor(ThreadPoolExecutor(1))
    loop.run_in_executor(None, release.wait, 120)  # its only thread is now busy
    try:
        async with Unpacker(tmp_path / "code") as unpacker:
            digest, package = stored_package(tmp_path, wrap(tar_of(), ["zstd"]))
            result = await asyncio.wait_for(unpacker.unpack(digest, package), 60)
            assert tree_of(result.path) == expected_modes(FILES)
            await asyncio.wait_for(unpacker.remove(digest), 60)
    finally:
        release.set()


@pytest.mark.slow
def test_a_worker_does_not_run_the_agents_main_module_again(tmp_path: Path) -> None:
    """multiprocessing re-runs ``__main__`` in a spawned child; ours must not (an
    unguarded script would start unpacking again inside the worker)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("hello.txt")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"hi"))
    (tmp_path / "pkg.tar").write_bytes(buf.getvalue())
    (tmp_path / "out").mkdir()
    script = tmp_path / "unguarded.py"
    script.write_text(
        textwrap.dedent(
            """
            import asyncio, sys
            from pathlib import Path
            from cachesvc.unpack.codec import Limits
            from cachesvc.unpack.worker import Workers

            print("main ran", file=sys.stderr)
            async def main():
                workers = Workers(1)
                here = Path(__file__).parent
                print(await workers.extract(here / "pkg.tar", here / "out", Limits()))
                await workers.aclose()
            asyncio.run(main())
            """
        )
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    assert "Extracted(files=1, bytes=2, layers=('tar',))" in done.stdout
    assert done.stderr.count("main ran") == 1
    assert (tmp_path / "out" / "hello.txt").read_bytes() == b"hi"


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        ({"error": "unsafe_archive", "detail": "link"}, UnsafeArchive),
        ({"error": "too_large", "detail": "big"}, TooLarge),
        ({"error": "unsupported_format", "detail": "odd"}, UnsupportedFormat),
        ({"error": "internal", "detail": "bug"}, CachesvcError),
        ({"error": "not_found", "detail": "a worker may not pick any code"}, CachesvcError),
        ({"files": "1", "bytes": 2, "layers": ["tar"]}, CachesvcError),
        ({"files": 1, "bytes": 2, "layers": ["tar", "../../etc"]}, CachesvcError),
        ({"files": 1, "bytes": 2}, CachesvcError),
    ],
)
def test_a_workers_answer_is_checked_like_any_untrusted_input(
    answer: dict[str, object], error: type[CachesvcError]
) -> None:
    with pytest.raises(error) as raised:
        _decode(answer)
    assert type(raised.value) is error


def test_a_good_answer_is_the_extraction() -> None:
    answer = {"files": 3, "bytes": 10, "layers": ["zstd", "tar"]}
    assert _decode(answer) == Extracted(3, 10, ("zstd", "tar"))
