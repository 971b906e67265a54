"""Child processes of a load-test run: start on loopback, wait until ready, stop.

Every wait is bounded; every process is stopped by its own pid (never by
name), first politely, then with SIGKILL after a grace period.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import aiohttp

READY_TIMEOUT_S = 30.0
STOP_GRACE_S = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def venv_tool(name: str) -> str:
    """A console script of this interpreter's environment (else from PATH)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise RuntimeError(f"start {name}: not installed beside {sys.executable} nor on PATH")
    return found


@dataclass
class Child:
    """A started child process, its log file and the signal that stops it cleanly."""

    name: str
    proc: asyncio.subprocess.Process
    log: Path
    stop_signal: int = signal.SIGTERM

    async def stop(self) -> None:
        if self.proc.returncode is not None:
            return
        self.proc.send_signal(self.stop_signal)
        try:
            await asyncio.wait_for(self.proc.wait(), STOP_GRACE_S)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


async def spawn(name: str, argv: list[str], log: Path, env: dict[str, str] | None = None) -> Child:
    """Start ``argv`` with stdout and stderr to ``log``."""
    with open(log, "ab") as out:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
        )
    return Child(name, proc, log)


async def wait_ready(child: Child, url: str, ok: tuple[int, ...] = (200,)) -> None:
    """Poll ``url`` until it answers one of ``ok``; if the child dies or time runs
    out, stop the child and raise."""
    try:
        await _poll(child, url, ok)
    except BaseException:
        await child.stop()
        raise


async def _poll(child: Child, url: str, ok: tuple[int, ...]) -> None:
    deadline = asyncio.get_running_loop().time() + READY_TIMEOUT_S
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while asyncio.get_running_loop().time() < deadline:
            if child.proc.returncode is not None:
                code = child.proc.returncode
                raise RuntimeError(f"start {child.name}: exited {code}, see {child.log}")
            try:
                async with session.get(url) as resp:
                    if resp.status in ok:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"start {child.name}: {url} not ready in {READY_TIMEOUT_S}s ({child.log})")
