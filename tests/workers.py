"""Unpack workers as tests drive them: a package file beside an empty
destination (``job``), and the pid of the worker that runs it (``running_pid``)."""

from __future__ import annotations

from pathlib import Path

from cachesvc.unpack.worker import Workers
from tests.servers import eventually


def job(tmp_path: Path, data: bytes, name: str = "pkg") -> tuple[Path, Path]:
    """A package file and an empty destination directory."""
    package, dest = tmp_path / name, tmp_path / f"{name}.out"
    package.write_bytes(data)
    dest.mkdir()
    return package, dest


async def running_pid(workers: Workers) -> int:
    pids = await eventually(workers.pids, "a worker started", step=0.01)
    return pids[0]
