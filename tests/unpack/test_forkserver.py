"""The unpack fork server: workers hold nothing of it, and nothing outlives the agent."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cachesvc.errors import CachesvcError
from cachesvc.unpack.codec import Limits
from cachesvc.unpack.worker import Budget, Workers
from tests import hostile
from tests.archives import tar_of
from tests.servers import eventually
from tests.workers import job, running_pid

REPO = Path(__file__).resolve().parents[2]


def parent_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("PPid:")).split()[1])


def confined(pid: int) -> bool:
    """The worker has set its limits: it dropped the server's descriptors before."""
    rows = Path(f"/proc/{pid}/limits").read_text().splitlines()
    return "unlimited" not in next(row for row in rows if "Max cpu time" in row)


def open_files(pid: int) -> dict[int, str]:
    """What each descriptor of ``pid`` points at (one closed meanwhile is left out)."""
    found = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            found[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
    return found


def dead(pid: int) -> bool:
    """Gone, or a zombie nobody reaps yet (an orphan's reaper may be slow)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


async def test_a_worker_holds_only_its_package_and_its_answer_pipe(tmp_path: Path) -> None:
    """Not the server's control socket (it could ask for more workers) nor any
    status socket (it could forge an exit code)."""
    workers = Workers(1, Budget(timeout=60))
    package, dest = job(tmp_path, hostile.digit_bomb())
    try:
        attempt = asyncio.ensure_future(workers.extract(package, dest, Limits()))
        pid = await running_pid(workers)
        await eventually(lambda: confined(pid), "the worker confined itself", step=0.01)
        fds = open_files(pid)
    finally:
        await workers.aclose()
    with pytest.raises(CachesvcError):
        await attempt
    own = [link for fd, link in fds.items() if fd > 2]  # beyond stdin, stdout, stderr
    pipes = [link for link in own if link.startswith("pipe:")]
    assert len(pipes) == 1, own  # its answer pipe
    assert set(own) - set(pipes) == {str(package)}, own  # opened again by the tar reader


async def test_the_fork_server_runs_a_single_thread_so_forking_it_is_safe(tmp_path: Path) -> None:
    """A thread in the server (an import that starts one, say) would make every
    fork a deadlock risk, and newer Pythons warn about it."""
    workers = Workers(1, Budget(timeout=60))
    package, dest = job(tmp_path, hostile.digit_bomb())
    try:
        attempt = asyncio.ensure_future(workers.extract(package, dest, Limits()))
        server = parent_of(await running_pid(workers))
        threads = os.listdir(f"/proc/{server}/task")
    finally:
        await workers.aclose()
    with pytest.raises(CachesvcError):
        await attempt
    assert threads == [str(server)]


async def test_a_new_fork_server_starts_after_the_old_one_died(tmp_path: Path) -> None:
    workers = Workers(1, Budget(timeout=60))
    package, dest = job(tmp_path, hostile.digit_bomb(), "bomb")
    try:
        attempt = asyncio.ensure_future(workers.extract(package, dest, Limits()))
        worker = await running_pid(workers)
        os.kill(parent_of(worker), signal.SIGKILL)
        with pytest.raises(CachesvcError, match="no answer"):
            await attempt  # its worker died with the server
        await eventually(lambda: dead(worker), "the worker died with its server")
        found = await workers.extract(*job(tmp_path, tar_of(), "good"), Limits())
    finally:
        await workers.aclose()
    assert found.files > 0


async def test_the_fork_server_and_its_workers_die_with_a_killed_agent(tmp_path: Path) -> None:
    package, dest = job(tmp_path, hostile.digit_bomb())
    script = tmp_path / "agent.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import asyncio
            from pathlib import Path
            from cachesvc.unpack.codec import Limits
            from cachesvc.unpack.worker import Workers

            async def main():
                workers = Workers(1)
                attempt = asyncio.ensure_future(
                    workers.extract(Path({str(package)!r}), Path({str(dest)!r}), Limits())
                )
                while not workers.pids():
                    await asyncio.sleep(0.01)
                print(workers.pids()[0], flush=True)
                await attempt
            asyncio.run(main())
            """
        )
    )
    agent = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    try:
        assert agent.stdout is not None
        worker = int(await asyncio.to_thread(agent.stdout.readline))
        server = parent_of(worker)
    finally:
        agent.kill()
        agent.wait()
        if agent.stdout is not None:
            agent.stdout.close()
    await eventually(lambda: dead(worker), "the worker died with its agent")
    await eventually(lambda: dead(server), "the fork server exited with its agent")
