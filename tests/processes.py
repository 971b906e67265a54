"""Real ``cachesvc`` processes for the tests that need a process boundary
(``kill -9``, SIGTERM, locks held across processes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import aiohttp

from tests.http import get
from tests.servers import eventually, free_port


class AgentProcess:
    """``cachesvc agent`` as a child process on a loopback port."""

    def __init__(self, root: Path, origin: str, peers: str) -> None:
        self.root, self.origin, self.peers = root, origin, peers
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        """The running child (a test that signals it must have started it)."""
        assert self._proc is not None, "the agent was never started"
        return self._proc

    async def start(self) -> AgentProcess:
        """Start it and wait until it is ready; fails with its stderr if it exits."""
        args = [sys.executable, "-m", "cachesvc", "agent",
                "--listen", f"127.0.0.1:{self.port}", "--cache-dir", str(self.root / "cache"),
                "--cache-size", "1GiB", "--origin", self.origin, "--peers", self.peers,
                "--shutdown-grace", "10", "--peer-connect-timeout", "0.5"]  # fmt: skip
        proc = self._proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        stderr = proc.stderr
        assert stderr is not None

        async def ready() -> bool:
            try:
                if (await get(f"{self.url}/readyz")).status == 200:
                    return True
            except aiohttp.ClientError:
                pass
            assert proc.poll() is None, stderr.read().decode()
            return False

        await eventually(ready, "the agent ready", step=0.1)
        return self

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()


def publish_cli(tmp_path: Path, package: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    """``cachesvc publish PACKAGE`` to the file origin ``tmp_path/origin``, as a process."""
    argv = [sys.executable, "-m", "cachesvc", "publish", str(package),
            "--origin", f"file://{tmp_path / 'origin'}", *flags]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)
