"""Bytes in flight: hosts that share their egress among uploads, chunk by chunk.

The model, and why it is exact for it:

* A package is ``size`` bytes cut into chunks of ``chunk`` bytes (the last
  one shorter). A host forwards chunk i only once it holds all of chunk i
  (chunked cut-through: a follower of a growing file sends what is written).
* Each host sends at most ``egress`` bytes/s in total, shared equally among
  its uploads that have a chunk to send (processor sharing: an upload waiting
  for its sender's next chunk takes nothing). The local client of an agent is
  one of those uploads, like a child host.
* Between two events the set of sending uploads of every host is fixed, so
  every rate is constant: the engine jumps from one chunk completion to the
  next. Per host it keeps a virtual clock ``v`` (bytes served to each sending
  upload so far) that grows at ``egress / n``; an upload that starts a chunk
  at ``v0`` ends it when ``v`` reaches ``v0 + bytes``. A change at one host
  moves only that host's next event: one heap push, whatever its fan-out
  (K = 0 at 5,000 hosts is one host with 5,000 uploads).
* Receivers take any rate (a host receives from one parent, which sends at
  most its own egress); a hop costs its latency once, before the first byte.

Not modelled: TCP slow start, CPU, disk, losses; see ``sim/__init__.py``.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

EPS = 1e-9


@dataclass(eq=False)
class Flow:
    """One upload: ``sender`` → ``receiver`` (None: the sender's local client)."""

    sender: Host
    receiver: Host | None
    sent: int = 0  # chunks fully sent
    done_at: float | None = None


@dataclass(eq=False)
class Host:
    """A NIC with an egress limit and the chunks of the package it holds."""

    name: str
    egress: float  # bytes per second
    engine: Engine
    have: int = 0  # whole chunks held
    held_at: float | None = None  # when it held every chunk
    uploaded: int = 0  # body bytes sent to other hosts (not to its local client)
    flows: list[Flow] = field(default_factory=list)  # every upload it was asked for
    _v: float = 0.0
    _t: float = 0.0
    _sending: list[tuple[float, int, Flow]] = field(default_factory=list)
    _waiting: list[Flow] = field(default_factory=list)  # for this host's next chunk
    _version: int = 0

    def start(self, flow: Flow) -> None:
        """Begin an upload now: sending if the chunk is here, else waiting for it."""
        self.flows.append(flow)
        self._offer(flow)

    def receive(self, now: float) -> None:
        """One more chunk arrived: uploads waiting for it start sending it."""
        self.have += 1
        if self.have == self.engine.chunks:
            self.held_at = now
        waiting, self._waiting = self._waiting, []
        if waiting:
            self._advance(now)
            for flow in waiting:
                self._push(flow)
            self._reschedule(now)

    def _offer(self, flow: Flow) -> None:
        now = self.engine.now
        if flow.sent >= self.have:
            self._waiting.append(flow)
            return
        self._advance(now)
        self._push(flow)
        self._reschedule(now)

    def _push(self, flow: Flow) -> None:
        nbytes = self.engine.chunk_bytes(flow.sent)
        heapq.heappush(self._sending, (self._v + nbytes, next(self.engine.seq), flow))

    def _advance(self, now: float) -> None:
        if self._sending:
            self._v += (now - self._t) * self.egress / len(self._sending)
        self._t = now

    def _reschedule(self, now: float) -> None:
        self._version += 1
        if self._sending:
            ahead = max(0.0, self._sending[0][0] - self._v)
            when = now + ahead * len(self._sending) / self.egress
            self.engine.at(when, self._chunk_sent, self._version)

    def _chunk_sent(self, version: int) -> None:
        if version != self._version:
            return  # superseded by a later change at this host
        now = self.engine.now
        self._advance(now)
        finish, _, flow = heapq.heappop(self._sending)
        self._v = max(self._v, finish)  # no drift from float rounding
        self._deliver(flow, now)
        if flow.sent < self.engine.chunks:
            self._offer_after_send(flow)
        else:
            flow.done_at = now
        self._reschedule(now)

    def _offer_after_send(self, flow: Flow) -> None:
        if flow.sent >= self.have:
            self._waiting.append(flow)
        else:
            self._push(flow)

    def _deliver(self, flow: Flow, now: float) -> None:
        nbytes = self.engine.chunk_bytes(flow.sent)
        flow.sent += 1
        if flow.receiver is not None:
            self.uploaded += nbytes
            flow.receiver.receive(now)


class Engine:
    """The event heap and the package's chunking. Events run in time order,
    ties in the order they were scheduled (deterministic)."""

    def __init__(self, size: int, chunk: int) -> None:
        if size <= 0 or chunk <= 0:
            raise ValueError(f"package size {size} and chunk {chunk} must be positive")
        self.size = size
        self.chunk = chunk
        self.chunks = -(-size // chunk)
        self.now = 0.0
        self.events = 0
        self.seq = itertools.count()
        self._heap: list[tuple[float, int, Callable[..., None], tuple[object, ...]]] = []

    def chunk_bytes(self, index: int) -> int:
        return min(self.chunk, self.size - index * self.chunk)

    def host(self, name: str, egress: float, holds_all: bool = False) -> Host:
        if egress <= 0:
            raise ValueError(f"host {name}: egress {egress} must be positive")
        host = Host(name, egress, self)
        if holds_all:
            host.have, host.held_at = self.chunks, 0.0
        return host

    def at(self, when: float, fn: Callable[..., None], *args: object) -> None:
        heapq.heappush(self._heap, (max(when, self.now), next(self.seq), fn, args))

    def upload(self, sender: Host, receiver: Host | None, when: float) -> Flow:
        """An upload whose first byte may leave at ``when`` (after the hop's latency)."""
        flow = Flow(sender, receiver)
        self.at(when, sender.start, flow)
        return flow

    def run(self, max_events: int) -> float:
        """Run to the end; returns the time of the last event. Raises if more
        than ``max_events`` events would be needed (a bound, not a budget)."""
        while self._heap:
            if self.events >= max_events:
                raise RuntimeError(f"simulation exceeded {max_events} events at t={self.now}")
            when, _, fn, args = heapq.heappop(self._heap)
            self.now = when
            self.events += 1
            fn(*args)
        return self.now
