"""Two real ``cachesvc agent`` processes on one cache dir (or one code dir):
the second exits at once, its last line naming the path and the first's pid."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from tests.processes import AgentProcess
from tests.servers import eventually

pytestmark = pytest.mark.slow  # real cachesvc processes


def agent_args(origin: str, cache: Path, code: Path) -> list[str]:
    return [sys.executable, "-m", "cachesvc", "agent", "--listen", "127.0.0.1:0",
            "--cache-dir", str(cache), "--code-dir", str(code), "--origin", origin]  # fmt: skip


def second_agent(origin: str, cache: Path, code: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        agent_args(origin, cache, code), capture_output=True, text=True, timeout=30
    )


async def test_a_second_agent_on_the_same_cache_dir_exits_naming_the_owner(tmp_path: Path) -> None:
    (tmp_path / "origin").mkdir()
    origin = f"file://{tmp_path / 'origin'}"
    first = await AgentProcess(tmp_path / "first", origin, "").start()
    assert first.proc is not None
    try:
        cache = first.root / "cache"
        in_flight = cache / "tmp" / f"{'0' * 64}.part"  # what a second owner's sweep would remove
        in_flight.write_bytes(b"downloading")
        out = await asyncio.to_thread(second_agent, origin, cache, tmp_path / "code2")
        assert out.returncode != 0
        last = out.stderr.strip().splitlines()[-1]
        assert f"cache dir {cache} is in use by pid {first.proc.pid} (lock {cache}/.lock)" in last
        assert in_flight.exists() and first.proc.poll() is None  # the first one is unharmed
    finally:
        first.stop()


async def test_a_second_agent_on_the_same_code_dir_exits_naming_the_owner(tmp_path: Path) -> None:
    origin, code = f"file://{tmp_path / 'origin'}", tmp_path / "code"
    cache1, cache2 = tmp_path / "c1", tmp_path / "c2"
    first = subprocess.Popen(
        agent_args(origin, cache1, code), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    errors = first.stderr
    assert errors is not None
    try:

        def holds_the_code_dir() -> bool:
            assert first.poll() is None, errors.read().decode()
            lock = code / ".lock"
            return lock.exists() and bool(lock.read_text().strip())

        await eventually(holds_the_code_dir, "the first agent holding the code dir", step=0.05)
        out = await asyncio.to_thread(second_agent, origin, cache2, code)
        assert out.returncode != 0
        last = out.stderr.strip().splitlines()[-1]
        assert f"code dir {code} is in use by pid {first.pid} (lock {code}/.lock)" in last
    finally:
        first.kill()
        first.wait()
        errors.close()
