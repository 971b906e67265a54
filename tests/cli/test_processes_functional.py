"""Real ``cachesvc`` processes: kill -9 mid-download, SIGTERM mid-transfer."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.http import get
from tests.processes import AgentProcess
from tests.servers import (
    digest_of,
    eventually,
    free_port,
    free_port_run,
    payload,
    start_fake_peer,
    start_server,
    store_files,
)

pytestmark = pytest.mark.slow  # real cachesvc processes

MiB = 1 << 20


@pytest.fixture
async def slow_origin_and_peer(tmp_path: Path) -> AsyncIterator[tuple[str, str, bytes]]:
    """A file origin with an 8 MiB package, and a peer that trickles it (~3 s)."""
    data = payload(8 * MiB, seed=40)
    blob = tmp_path / "origin" / "blobs" / "sha256" / digest_of(data).hex
    blob.parent.mkdir(parents=True)
    blob.write_bytes(data)
    runner, peer = await start_fake_peer("slow", {digest_of(data).hex: data}, delay=0.025)
    yield f"file://{tmp_path / 'origin'}", peer, data
    await runner.cleanup()


async def wait_for_partial(tmp_dir: Path) -> None:
    await eventually(
        lambda: any(f.stat().st_size > 0 for f in tmp_dir.iterdir()), "a partial download"
    )


async def restart_without_peers(agent: AgentProcess) -> None:
    agent.peers = ""  # the restarted agent reads the origin directly
    await agent.start()


async def get_once(agent: AgentProcess, digest: str) -> tuple[str, bytes]:
    """GET a package through the agent: (X-Cache-Tier, body)."""
    status, headers, body = await get(f"{agent.url}/pkg/{digest}")
    assert status == 200
    return headers["X-Cache-Tier"], body


async def test_kill_9_mid_download_leaves_nothing_partial(
    tmp_path: Path, slow_origin_and_peer: tuple[str, str, bytes]
) -> None:
    origin, peer, data = slow_origin_and_peer
    agent = await AgentProcess(tmp_path / "agent", origin, peer).start()
    try:
        async with aiohttp.ClientSession() as session:
            download = asyncio.ensure_future(session.get(f"{agent.url}/pkg/{digest_of(data)}"))
            await wait_for_partial(agent.root / "cache" / "tmp")
            agent.proc.send_signal(signal.SIGKILL)
            agent.proc.wait()
            download.cancel()
        assert [f for f in store_files(agent.root / "cache") if f.startswith("tmp/")]

        await restart_without_peers(agent)
        assert store_files(agent.root / "cache") == []  # swept: no partial, no blob
        assert await get_once(agent, str(digest_of(data))) == ("ORIGIN", data)
    finally:
        agent.stop()


async def test_sigterm_finishes_the_transfer_in_flight_and_keeps_the_store_consistent(
    tmp_path: Path, slow_origin_and_peer: tuple[str, str, bytes]
) -> None:
    origin, peer, data = slow_origin_and_peer
    agent = await AgentProcess(tmp_path / "agent", origin, peer).start()
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{agent.url}/pkg/{digest_of(data)}") as r:
                first = await r.content.readexactly(MiB)
                agent.proc.send_signal(signal.SIGTERM)
                body = first + await r.read()
        assert body == data
        assert await asyncio.to_thread(agent.proc.wait, 15) == 0
        assert [f for f in store_files(agent.root / "cache") if f.startswith("tmp/")] == []

        await restart_without_peers(agent)
        assert await get_once(agent, str(digest_of(data))) == ("L1", data)
    finally:
        agent.stop()


def test_the_cli_explains_itself() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "cachesvc", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for command in ("agent", "peer", "up", "publish", "fetch"):
        assert command in out
    assert "CACHESVC_TOKEN" in out


async def test_publish_then_fetch_through_the_cli(tmp_path: Path) -> None:
    package = tmp_path / "app.zip"
    package.write_bytes(payload(300_000, seed=41))
    origin = f"file://{tmp_path / 'origin'}"
    env = {**os.environ, "CACHESVC_ORIGIN": origin}
    pub = subprocess.run(
        [sys.executable, "-m", "cachesvc", "publish", str(package), "--tenant", "t1",
         "--function", "f", "--version", "1"], capture_output=True, text=True, env=env)  # fmt: skip
    assert pub.returncode == 0, pub.stderr
    digest = pub.stdout.strip()
    assert digest == str(digest_of(package.read_bytes()))
    ref = (tmp_path / "origin" / "tenants" / "t1" / "f" / "1.json").read_text()
    assert digest in ref

    agent = await AgentProcess(tmp_path / "agent", origin, "").start()
    try:
        out = tmp_path / "fetched.zip"
        fetch = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "cachesvc", "fetch", digest, "--agent", agent.url,
             "-o", str(out)], capture_output=True, text=True)  # fmt: skip
        assert fetch.returncode == 0, fetch.stderr
        assert out.read_bytes() == package.read_bytes() and "from ORIGIN" in fetch.stderr
        bad = subprocess.run([sys.executable, "-m", "cachesvc", "fetch", "sha256:nope"],
                             capture_output=True, text=True)  # fmt: skip
        assert bad.returncode == 1 and "is not sha256:<64 lowercase hex>" in bad.stderr
    finally:
        agent.stop()


async def test_cli_fetch_from_an_agent_that_sends_wrong_bytes_fails_and_keeps_nothing(
    tmp_path: Path,
) -> None:
    data = payload(100_000, seed=42)
    digest = digest_of(data)
    wrong = bytes([data[0] ^ 1]) + data[1:]

    async def package(request: web.Request) -> web.Response:
        return web.Response(body=wrong, headers={"X-Cache-Tier": "L1"})

    app = web.Application()
    app.router.add_get("/pkg/{digest}", package)
    runner, liar = await start_server(app)
    try:
        out = tmp_path / "fetched.zip"
        fetch = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "cachesvc", "fetch", str(digest), "--agent", liar,
             "-o", str(out)], capture_output=True, text=True)  # fmt: skip
    finally:
        await runner.cleanup()
    assert fetch.returncode == 1
    assert f"{digest.short}: bytes hash to sha256:{digest_of(wrong).hex[:12]}" in fetch.stderr
    assert list(tmp_path.iterdir()) == []  # neither the output nor its part file


async def test_up_runs_a_stack_that_serves_its_sample_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    agent_port, peer_port = free_port(), free_port_run(3)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cachesvc", "up", "--dir", str(tmp_path),
         "--agent-port", str(agent_port), "--peer-port", str(peer_port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        lines: list[str] = []
        printed, err = proc.stdout, proc.stderr
        assert printed is not None and err is not None
        while not any(line.startswith("Ctrl-C") for line in lines):
            line = await asyncio.wait_for(asyncio.to_thread(printed.readline), 20)
            assert line, f"cachesvc up exited early: {err.read()[-3000:]}"
            lines.append(line)
        curls = [line.split("#")[0].strip() for line in lines if "curl" in line and "/pkg/" in line]
        digest = next(w for w in curls[0].split() if "/pkg/" in w).rsplit("/", 1)[1]
        tiers = []
        for _ in range(2):  # the printed command, run as printed
            out = await asyncio.to_thread(
                subprocess.run, curls[0], shell=True, capture_output=True, text=True
            )
            tiers += [h.split(":")[1].strip() for h in out.stdout.splitlines()
                      if h.lower().startswith("x-cache-tier")]  # fmt: skip
        assert tiers == ["L2", "L1"], lines
        assert digest.startswith("sha256:")
        proc.send_signal(signal.SIGINT)
        assert await asyncio.to_thread(proc.wait, 15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_busy_port_is_a_clear_error_not_a_traceback(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "cachesvc", "peer", "--listen", f"127.0.0.1:{port}",
             "--cache-dir", str(tmp_path / "c"), "--origin", f"file://{tmp_path}"],
            capture_output=True, text=True, timeout=30)  # fmt: skip
    assert out.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr and "Traceback" not in out.stderr


def test_publish_repack_uploads_a_smaller_tar_zst_and_reports_sizes(tmp_path: Path) -> None:
    import zipfile

    from cachesvc.unpack.codec import detect_layers

    package = tmp_path / "app.zip"
    common = os.urandom(64 * 1024)  # the same library vendored in many places
    with zipfile.ZipFile(package, "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(20):
            zf.writestr(f"vendor/copy{i}/lib.so", common)
        zf.writestr("handler.py", "def handler(e, c):\n    return 1\n")
    out = subprocess.run(
        [sys.executable, "-m", "cachesvc", "publish", str(package), "--repack",
         "--tenant", "t", "--function", "f", "--version", "1",
         "--origin", f"file://{tmp_path / 'origin'}"], capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "repack: zip" in out.stderr and "using tar.zst" in out.stderr
    digest = out.stdout.strip()
    blob = tmp_path / "origin" / "blobs" / "sha256" / digest.removeprefix("sha256:")
    assert blob.stat().st_size < package.stat().st_size / 5
    assert detect_layers(blob) == ["zstd", "tar"]
