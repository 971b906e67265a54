"""A keep-alive load client for a request trace, run as its own process.

Usage (``bench/zipf.py`` runs it)::

    python bench/zipfclient.py TRACE_JSON CONNECTIONS HOST[,HOST...]

``TRACE_JSON`` is a list of paths. ``CONNECTIONS`` keep-alive connections
(connection ``i`` to host ``i mod len(hosts)``) take the next path of the trace
as soon as their previous response ended, until the trace is done. Bodies are
received with ``recv_into`` one shared buffer and discarded (``asyncio.
BufferedProtocol``), so per byte the client pays the kernel copy only. Prints
one JSON object: requests, errors, seconds, requests per second, latency p50
and p99 (from request written to last body byte), and ``X-Cache-Tier`` counts.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from collections import Counter

_BUF = memoryview(bytearray(1 << 20))


class KeepAlive(asyncio.BufferedProtocol):
    """One connection; :meth:`get` one response at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[tuple[int, str]] | None = None
        self.head = b""
        self.status = 0
        self.tier = ""
        self.left = -1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    async def get(self, host: str, path: str) -> tuple[int, str]:
        assert self.transport is not None
        self.head, self.status, self.left = b"", 0, -1
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        return await self.waiter

    def get_buffer(self, sizehint: int) -> memoryview:
        return _BUF

    def buffer_updated(self, nbytes: int) -> None:
        if self.left < 0:
            self.head += bytes(_BUF[:nbytes])
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            self._parse(self.head[:end].decode("latin-1"))
            nbytes = len(self.head) - end - 4
        self.left -= nbytes
        if self.left <= 0 and self.waiter is not None and not self.waiter.done():
            self.waiter.set_result((self.status, self.tier))

    def _parse(self, head: str) -> None:
        lines = head.split("\r\n")
        self.status = int(lines[0].split()[1])
        self.tier, self.left = "", 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                self.left = int(value)
            elif name in ("x-cache-tier", "x-cache-status"):
                self.tier = value.strip()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection lost: {exc}"))


async def run(trace: list[str], connections: int, hosts: list[str]) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    next_index = iter(range(len(trace)))
    latencies: list[float] = []
    tiers: Counter[str] = Counter()
    errors = 0

    async def worker(i: int) -> None:
        nonlocal errors
        host = hosts[i % len(hosts)].removeprefix("http://")
        name, port = host.rsplit(":", 1)
        _, conn = await loop.create_connection(KeepAlive, name, int(port))
        for index in next_index:
            t0 = time.perf_counter()
            try:
                status, tier = await asyncio.wait_for(conn.get(host, trace[index]), 60)
            except (ConnectionError, TimeoutError):
                errors += 1
                _, conn = await loop.create_connection(KeepAlive, name, int(port))
                continue
            latencies.append(time.perf_counter() - t0)
            tiers[tier or "-"] += 1
            errors += status != 200
        assert conn.transport is not None
        conn.transport.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(connections)))
    seconds = time.perf_counter() - start
    cuts = statistics.quantiles(latencies, n=100)
    return {
        "requests": len(latencies),
        "errors": errors,
        "seconds": seconds,
        "rps": len(latencies) / seconds,
        "p50_ms": cuts[49] * 1000,
        "p99_ms": cuts[98] * 1000,
        "tiers": dict(tiers),
    }


def main() -> int:
    trace = json.loads(open(sys.argv[1]).read())
    result = asyncio.run(run(trace, int(sys.argv[2]), sys.argv[3].split(",")))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
