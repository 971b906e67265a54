"""Command-line tools the baselines need (nginx, wrk, curl): found on ``PATH``,
or installed from Debian when this process may, or a reason why not.

Installing needs root and ``apt-get``. When either is missing, :func:`require`
raises :class:`ToolUnavailable` whose message names the tool and the reason, so
the caller can leave that baseline out and say why (the tests skip, the load
test and the benchmark run without it); never a traceback from ``apt-get``.

Tools are looked up on ``PATH`` only, as a shell would. We rejected also
searching ``/usr/sbin`` (where Debian puts nginx, and which a non-root user's
``PATH`` usually lacks): a tool found behind the user's back makes "nginx
absent" impossible to arrange for a test, and the message below points at it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")
APT_TIMEOUT_S = {"update": 600, "install": 900}


class ToolUnavailable(RuntimeError):
    """A tool is not on PATH and cannot be installed here; the message says why."""


def install_blocker(euid: int, apt_get: str | None) -> str | None:
    """Why ``apt-get install`` cannot run here, or None when it may."""
    if euid != 0:
        return f"installing needs root (running as uid {euid})"
    if apt_get is None:
        return "apt-get is not available"
    return None


def require(tools: dict[str, str]) -> dict[str, str]:
    """Paths of the commands ``{command: Debian package}``, installing the
    packages of missing ones first when we may.

    Raises :class:`ToolUnavailable` naming every missing command and why it
    could not be had. Blocks for at most the apt-get timeouts."""
    missing = sorted(cmd for cmd in tools if shutil.which(cmd) is None)
    if missing:
        blocker = install_blocker(os.geteuid(), shutil.which("apt-get"))
        if blocker is not None:
            raise ToolUnavailable(f"{_names(missing)}: {blocker}{_sbin_hint(missing)}")
        error = apt_install(sorted({tools[cmd] for cmd in missing}))
        still = sorted(cmd for cmd in tools if shutil.which(cmd) is None)
        if still:
            why = error or "installed, but not on PATH"
            raise ToolUnavailable(
                f"{_names(still)} after apt-get install: {why}{_sbin_hint(still)}"
            )
    return {cmd: str(shutil.which(cmd)) for cmd in tools}


def apt_install(packages: list[str]) -> str | None:
    """``apt-get update`` then ``install -y``; the error, or None on success."""
    apt = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "-qq"]
    for step, args in (("update", ["update"]), ("install", ["install", "-y", *packages])):
        try:
            done = subprocess.run(
                [*apt, *args], capture_output=True, text=True, timeout=APT_TIMEOUT_S[step]
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"apt-get {step}: {exc}"
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
            return f"apt-get {step} exited {done.returncode}: {lines[-1]}"
    return None


def _names(commands: list[str]) -> str:
    return ", ".join(commands) + (" is" if len(commands) == 1 else " are") + " not on PATH"


def _sbin_hint(commands: list[str]) -> str:
    """Point at a copy in an sbin directory that PATH leaves out."""
    on_path = set(os.environ.get("PATH", "").split(os.pathsep))
    for cmd in commands:
        for directory in SBIN:
            if directory not in on_path and (Path(directory) / cmd).is_file():
                return f" ({directory}/{cmd} exists: add {directory} to PATH)"
    return ""
