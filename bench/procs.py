"""Processes, ports and tools for the benchmarks: start on loopback, stop them all.

Every wait here is bounded in time and in tries; :meth:`Procs.stop_all` ends
exactly the processes this object started (by pid, never by name): SIGQUIT for
nginx (graceful), SIGTERM for everything else, then SIGKILL after a grace.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 30.0, ok: tuple[int, ...] = (200,)) -> None:
    """Poll ``url`` every 50 ms until it answers one of ``ok`` (or any status if
    ``ok`` is empty); raises after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.05) + 1):
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if not ok or resp.status in ok:
                    return
        except urllib.error.HTTPError as exc:
            if not ok or exc.code in ok:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not become ready in {timeout:.0f}s")


def rss_bytes(pid: int) -> int:
    """VmRSS of a live process, from /proc/PID/status."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@dataclass
class Procs:
    """Child processes of one benchmark run; logs go to ``logs/<name>.log``."""

    logs: Path
    running: list[tuple[str, subprocess.Popen[bytes], int]] = field(default_factory=list)

    def start(
        self, name: str, argv: list[str], env: dict[str, str] | None = None, stop_sig: int = 0
    ) -> subprocess.Popen[bytes]:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 (closed with the child)
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        log.close()
        self.running.append((name, proc, stop_sig or signal.SIGTERM))
        return proc

    def log_of(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def stop_all(self, grace: float = 10.0) -> None:
        for _, proc, sig in reversed(self.running):
            if proc.poll() is None:
                proc.send_signal(sig)
        for name, proc, _ in reversed(self.running):
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                print(f"{name} (pid {proc.pid}) ignored its stop signal: killing it")
                proc.kill()
                proc.wait(timeout=5)
        self.running.clear()


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its live children (nginx: master + worker)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        children = [int(c) for c in f.read().split()]
    for p in [pid, *children]:
        with open(f"/proc/{p}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def publish_report(name: str, lines: list[str]) -> None:
    """Print a benchmark's figures and write them to ``bench/out/<name>.md``."""
    out = Path(__file__).resolve().parent / "out"
    out.mkdir(exist_ok=True)
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
