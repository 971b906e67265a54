"""A client for N concurrent HTTP/1.1 GETs that costs little per byte.

All connections are opened first; then every request is written in one pass
of the event loop, so they start within microseconds of each other. Bodies are
received with ``recv_into`` one shared 1 MiB buffer (``asyncio.BufferedProtocol``)
and discarded: per byte the client pays only the kernel copy, like
``curl -o /dev/null``, and far less Python than a stream reader would.

Timings per request, from the moment its request was written:
``ttfb`` = first response byte (curl's ``time_starttransfer``), ``total`` =
last body byte. A body shorter than its ``Content-Length`` is reported as such.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

_BUF = memoryview(bytearray(1 << 20))


@dataclass
class Result:
    status: int = 0
    tier: str = ""
    length: int = -1
    body: int = 0
    ttfb: float = float("nan")
    total: float = float("nan")

    @property
    def complete(self) -> bool:
        return self.status == 200 and self.body == self.length


class _Get(asyncio.BufferedProtocol):
    def __init__(self, done: asyncio.Future[None]) -> None:
        self.done = done
        self.result = Result()
        self.transport: asyncio.Transport | None = None
        self.t0 = 0.0
        self._head = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def send(self, request: bytes) -> None:
        assert self.transport is not None
        self.t0 = time.perf_counter()
        self.transport.write(request)

    def get_buffer(self, sizehint: int) -> memoryview:
        return _BUF

    def buffer_updated(self, nbytes: int) -> None:
        now = time.perf_counter()
        r = self.result
        if r.status == 0:
            if not self._head:
                r.ttfb = now - self.t0
            self._head += bytes(_BUF[:nbytes])
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return
            self._parse_head(self._head[:end].decode("latin-1"))
            r.body = len(self._head) - end - 4
            self._head = b"\0"
        else:
            r.body += nbytes
        if r.body >= r.length >= 0:
            r.total = now - self.t0
            self._finish()

    def _parse_head(self, head: str) -> None:
        lines = head.split("\r\n")
        self.result.status = int(lines[0].split()[1])
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                self.result.length = int(value)
            elif name == "x-cache-tier":
                self.result.tier = value.strip()

    def eof_received(self) -> bool:
        self._finish()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish()

    def _finish(self) -> None:
        if self.transport is not None:
            self.transport.close()
        if not self.done.done():
            self.done.set_result(None)


async def storm(
    targets: list[tuple[int, str]], timeout: float = 300.0, host: str = "127.0.0.1"
) -> list[Result]:
    """GET each ``(port, path)`` on its own connection, all at once."""
    loop = asyncio.get_running_loop()
    protocols: list[_Get] = []

    async def connect(port: int) -> _Get:
        done = loop.create_future()
        _, proto = await loop.create_connection(lambda: _Get(done), host, port)
        return proto

    protocols = list(await asyncio.gather(*(connect(port) for port, _ in targets)))
    for proto, (_, path) in zip(protocols, targets, strict=True):
        proto.send(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    try:
        async with asyncio.timeout(timeout):
            await asyncio.gather(*(p.done for p in protocols))
    finally:
        for p in protocols:
            p._finish()
    return [p.result for p in protocols]
