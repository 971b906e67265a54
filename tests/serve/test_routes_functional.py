"""Routes through real agents and peers: a method a route does not take is a
405 with ``Allow``; ``cachesvc fetch`` writes the stored bytes or, with
``--archive``, the archive inside them."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import zstandard

from tests.conftest import OriginFixture
from tests.http import request
from tests.servers import Stack

HEX = "ab" * 32


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("DELETE", f"/pkg/sha256:{HEX}", "GET, HEAD"),
        ("OPTIONS", f"/pkg/{HEX}", "GET, HEAD"),
        ("PUT", f"/pkg/sha256:{HEX}", "GET, HEAD"),
        ("POST", f"/pkg/sha256:{HEX}", "GET, HEAD"),
        ("GET", f"/pkg/sha256:{HEX}/unpack", "POST"),
        ("DELETE", f"/pkg/sha256:{HEX}/archive", "GET, HEAD"),
        ("DELETE", "/healthz", "GET, HEAD"),
        ("GET", "/warm", "POST"),
    ],
)
async def test_a_method_the_agent_route_does_not_take_is_405_with_allow(
    file_stack: Stack, method: str, path: str, allow: str
) -> None:
    agent = await file_stack.start_agent(peers=[])
    status, headers, body = await request(method, agent + path)
    assert (status, headers["allow"]) == (405, allow)
    if method != "HEAD":
        detail = f"method {method} not allowed; use {allow}"
        assert body == f'{{"error": "invalid_request", "detail": "{detail}"}}'.encode()


async def test_a_method_blob_does_not_take_is_405_only_for_holders_of_the_peer_token(
    file_stack: Stack,
) -> None:
    [peer] = await file_stack.start_peers(1, peer_token="pt")
    status, _, body = await request("PUT", f"{peer}/blob/{HEX}")
    assert status == 401 and b'"unauthorized"' in body
    status, headers, _ = await request("DELETE", f"{peer}/blob/{HEX}", token="pt")
    assert (status, headers["allow"]) == (405, "GET, HEAD")
    status, _, body = await request("GET", f"{peer}/blob/nope", token="pt")
    assert status == 400 and b'"invalid_digest"' in body


@pytest.mark.parametrize("path", ["/pkg/sha256:nope", "/pkg/a/b/c", "/pkg/"])
async def test_malformed_digests_are_still_400_invalid_digest(file_stack: Stack, path: str) -> None:
    agent = await file_stack.start_agent(peers=[])
    for method in ("GET", "HEAD"):
        status, headers, body = await request(method, agent + path)
        assert status == 400 and "allow" not in headers
        assert method == "HEAD" or b'"invalid_digest"' in body


def zstd_over_zip(size: int, corrupt: bool = False) -> tuple[bytes, bytes]:
    """(inner zip, zstd frame around it); ``corrupt`` flips the frame's checksum,
    so peeling fails only at the very end, after the body has started."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("handler.py", b"def handler(e, c):\n    return 1\n")
        zf.writestr("lib/data.bin", os.urandom(size))
    inner = buf.getvalue()
    outer = zstandard.ZstdCompressor(write_checksum=True).compress(inner)
    return inner, outer[:-1] + bytes([outer[-1] ^ 1]) if corrupt else outer


async def cachesvc_fetch(*args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "cachesvc", "fetch", *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


@pytest.mark.slow
async def test_fetch_writes_the_stored_bytes_or_the_inner_archive_and_says_which(
    file_stack: Stack, file_origin: OriginFixture, tmp_path: Path
) -> None:
    inner, outer = zstd_over_zip(100_000)
    digest = await file_origin.put(outer)
    agent = await file_stack.start_agent(peers=[])

    out = await cachesvc_fetch(str(digest), "--agent", agent, "-o", str(tmp_path / "app.zip.zst"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "app.zip.zst").read_bytes() == outer
    assert f"wrote the stored package, {len(outer)} bytes from ORIGIN" in out.stderr
    assert "(layers zstd,zip; --archive writes the inner archive)" in out.stderr

    out = await cachesvc_fetch(
        str(digest), "--agent", agent, "--archive", "-o", str(tmp_path / "app.zip")
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "app.zip").read_bytes() == inner
    assert f"wrote the inner zip archive, {len(inner)} bytes, to {tmp_path / 'app.zip'}" in (
        out.stderr
    )
    assert "(layers zstd,zip; peeled zstd)" in out.stderr


@pytest.mark.slow
async def test_fetch_archive_keeps_nothing_when_the_agent_aborts_mid_body(
    file_stack: Stack, file_origin: OriginFixture, tmp_path: Path
) -> None:
    _, outer = zstd_over_zip(3 << 20, corrupt=True)
    digest = await file_origin.put(outer)
    agent = await file_stack.start_agent(peers=[])
    out = await cachesvc_fetch(
        str(digest), "--agent", agent, "--archive", "-o", str(tmp_path / "app.zip")
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert list(tmp_path.glob("*app.zip*")) == []
