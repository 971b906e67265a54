"""``cachesvc up`` as a real process: its banner's claims hold, and the tokens
of the environment it runs in reach the services it starts."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from tests.http import get, head
from tests.servers import free_port, free_port_run

pytestmark = pytest.mark.slow  # real cachesvc processes


@asynccontextmanager
async def running_up(root: Path, **env: str) -> AsyncIterator[tuple[str, int]]:
    """``cachesvc up --dir root`` until its banner is complete: (banner, first peer
    port). Stopped with Ctrl-C (SIGINT) at the end, which must exit 0."""
    agent_port, peer_port = free_port(), free_port_run(3)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CACHESVC_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cachesvc", "up", "--dir", str(root),
         "--agent-port", str(agent_port), "--peer-port", str(peer_port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**clean, **env},
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    try:
        lines: list[str] = []
        while not lines or not lines[-1].startswith("Ctrl-C"):
            line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)
            assert line, f"cachesvc up exited early: {proc.stderr.read()[-3000:]}"
            lines.append(line)
        yield "".join(lines), peer_port
        proc.send_signal(signal.SIGINT)
        assert await asyncio.to_thread(proc.wait, 30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def claimed_first_tier(banner: str) -> tuple[str, str]:
    """(URL of the first curl line, the tier its comment promises)."""
    m = re.search(r"curl -sS -o /dev/null -D - (\S+)\s+# first: X-Cache-Tier: (\S+)", banner)
    assert m is not None, banner
    return m[1], m[2]


async def get_tier(url: str) -> str:
    reply = await get(url)
    assert reply.status == 200
    return reply.headers["X-Cache-Tier"]


async def test_the_banner_claims_the_tier_the_first_get_really_gets(tmp_path: Path) -> None:
    async with running_up(tmp_path) as (banner, _):
        url, claim = claimed_first_tier(banner)
        assert await get_tier(url) == claim == "L2"
        assert "CACHESVC_TOKEN is not set" in banner  # and how to set it:
        assert "CACHESVC_TOKEN=<a secret> cachesvc up" in banner
    # Restarted on the same data, the agent's disk already holds the sample.
    async with running_up(tmp_path) as (banner, _):
        url, claim = claimed_first_tier(banner)
        assert await get_tier(url) == claim == "L1"


async def test_up_passes_the_tokens_so_warm_can_be_tried_locally(tmp_path: Path) -> None:
    tokens = {"CACHESVC_TOKEN": "op-secret", "CACHESVC_PEER_TOKEN": "peer-secret"}
    async with running_up(tmp_path, **tokens) as (banner, peer_port):
        assert "op-secret" not in banner and "peer-secret" not in banner
        hint = next(line for line in banner.splitlines() if "cachesvc warm" in line)
        command = shlex.split(hint.split("#")[0])
        clean = {k: v for k, v in os.environ.items() if not k.startswith("CACHESVC_")}
        warm = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "cachesvc", *command[1:]],
            capture_output=True, text=True, timeout=120, env={**clean, **tokens},
        )  # fmt: skip
        assert warm.returncode == 0, warm.stdout + warm.stderr
        url, claim = claimed_first_tier(banner)
        blob = f"http://127.0.0.1:{peer_port}/blob/{url.rsplit('/', 1)[1]}"
        assert (await head(blob)).status == 401  # the peers require the peer token they were given
        assert await get_tier(url) == "L1"  # warm put it there
