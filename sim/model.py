"""One simulated run: an AZ (origin, owner peer P, N agents), an arrival
schedule, the tracker's choices, and what came out of it.

Hosts and hops, as the fan-out policy builds them:

* The origin sends to P only, at ``origin_bandwidth``, its first byte
  ``origin_latency`` after P's fill starts (when the first request has
  reached P: one ``hop_latency`` after it left): one origin GET, always
  (asserted).
* P (the ring owner, also the tracker) and every agent send at most
  ``egress`` bytes/s. Other peers hold no copy and take no part.
* Agent A arrives (its local client asks it) and asks P; the tracker names a
  parent. From P itself: first byte one ``hop_latency`` later; redirected to a
  member H: two (A asks P, then H). The local client's own request costs
  ``local_latency`` and is one more upload of A, sharing A's egress.
* A joins the tree when K > 0 (every simulated agent advertises).

Arrival schedules (``MODELS``), N hosts, each host fetching once, at its
first instance (a host already holding the package is a local hit and costs
nothing, so only first arrivals matter):

* ``storm``: all N at t = 0, in host order.
* ``waves``: the seeds' doubling waves, per host group. A host group is 63
  hosts; wave w = 0..5 starts at t = 10·w s and brings 2^w new hosts of every
  group (1, 2, 4 … 32: 63). N hosts form ⌈N/63⌉ groups, the last one partial
  (it fills waves in order). ``loadtest``'s locust shape doubles *concurrency*
  (1 → 32, 32 fetches on one group); the issue's text counts new instances,
  which is what is used here.
* ``burst``: ``loadtest``'s burst shape (2 steady instances, bursts to 20 in
  the middle 40 % of each 10 s cycle, 3 cycles: 2 + 3 × 18 = 56 fetches),
  scaled by host groups of 56: per group, 2 hosts at t = 0 and 18 new hosts at
  t = 3, 13 and 23 s (each burst lands on hosts without the package: the
  worst case).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from sim.engine import Engine, Flow, Host
from sim.tracker import Tracker

MiB = 1 << 20
EVENTS_PER_CHUNK = 8  # bound on events per (upload, chunk): a run that needs more is a bug

# model: (seconds, new hosts per group) steps
MODELS: dict[str, tuple[tuple[float, int], ...]] = {
    "storm": ((0.0, 1),),
    "waves": tuple((10.0 * w, 2**w) for w in range(6)),
    "burst": ((0.0, 2), (3.0, 18), (13.0, 18), (23.0, 18)),
}


@dataclass(frozen=True)
class Params:
    """One run's inputs. Bandwidths in bytes/s, latencies in seconds."""

    n: int
    size: int
    egress: float
    k: int
    model: str = "storm"
    chunk: int = MiB
    hop_latency: float = 0.0005
    local_latency: float = 0.0
    origin_latency: float = 0.020
    origin_bandwidth: float | None = None  # None: the hosts' egress

    def solo(self) -> Params:
        return Params(**{**asdict(self), "n": 1, "model": "storm"})


@dataclass
class Outcome:
    """What one run measured. Times in seconds from the first arrival."""

    params: Params
    time_to_all: float  # every agent holds the package
    wait_p50: float  # per agent: holds − arrived
    wait_max: float
    client_p50: float  # per agent: its local client's last byte − arrived
    client_max: float
    largest_upload: int  # bytes any host sent to other hosts
    uploader: str
    origin_gets: int
    depth: int  # hops from P to the deepest agent
    fallbacks: int
    events: int
    wall_s: float
    waits: list[float] = field(repr=False, default_factory=list)

    def row(self) -> dict[str, Any]:
        row = {**asdict(self.params), **asdict(self)}
        del row["params"], row["waits"]
        row["largest_upload_pkgs"] = self.largest_upload / self.params.size
        return row


def arrivals(model: str, n: int) -> list[float]:
    """Arrival time of each of ``n`` hosts, in join order (time, then group).

    Groups are filled one after the other, so only the last one is partial."""
    per_group = [t for t, count in MODELS[model] for _ in range(count)]
    groups = -(-n // len(per_group))
    slots = [(t, g) for g in range(groups) for t in per_group][:n]
    return [t for t, _ in sorted(slots)]


class Run:
    """Builds the AZ for one :class:`Params` and plays its arrivals."""

    def __init__(self, p: Params) -> None:
        self.p = p
        self.engine = Engine(p.size, p.chunk)
        origin_bw = p.origin_bandwidth or p.egress
        self.origin = self.engine.host("origin", origin_bw, holds_all=True)
        self.owner = self.engine.host("P", p.egress)
        self.tracker = Tracker("P", p.k)
        self.hosts: dict[str, Host] = {"P": self.owner}
        self.arrived: dict[str, float] = {}
        self.depth: dict[str, int] = {"P": 0}
        self.clients: dict[str, Flow] = {}
        self.filling = False

    def play(self) -> Outcome:
        t0 = time.perf_counter()
        for i, when in enumerate(arrivals(self.p.model, self.p.n)):
            self.engine.at(when, self._arrive, f"A{i}")
        bound = EVENTS_PER_CHUNK * self.engine.chunks * (2 * self.p.n + 1) + 4 * self.p.n + 16
        self.engine.run(bound)
        return self._outcome(time.perf_counter() - t0)

    def _arrive(self, name: str) -> None:
        now, p = self.engine.now, self.p
        agent = self.engine.host(name, p.egress)
        self.hosts[name], self.arrived[name] = agent, now
        if not self.filling:  # P's one fill starts with the first request
            self.engine.upload(self.origin, self.owner, now + p.hop_latency + p.origin_latency)
            self.filling = True
        pick = self.tracker.assign(name, p.k)
        hops = 1 if pick.parent == "P" else 2  # a redirect costs one more round trip
        self.engine.upload(self.hosts[pick.parent], agent, now + hops * p.hop_latency)
        self.depth[name] = self.depth[pick.parent] + 1
        self.clients[name] = self.engine.upload(agent, None, now + p.local_latency)

    def _outcome(self, wall: float) -> Outcome:
        agents = [h for name, h in self.hosts.items() if name != "P"]
        held = {h.name: h.held_at for h in agents if h.held_at is not None}
        missing = [h.name for h in agents if h.name not in held]
        assert not missing, f"simulation ended with agents not holding it: {missing[:5]}"
        origin_gets = len(self.origin.flows)
        assert origin_gets == 1, f"{origin_gets} origin GETs: the policy allows exactly one"
        done = {name: f.done_at for name, f in self.clients.items() if f.done_at is not None}
        assert done.keys() == held.keys(), "simulation ended with clients still reading"
        waits = [at - self.arrived[name] for name, at in held.items()]
        clients = [done[name] - self.arrived[name] for name in held]
        first = min(self.arrived.values())
        top = max(self.hosts.values(), key=lambda h: h.uploaded)
        return Outcome(
            self.p,
            max(held.values()) - first,
            statistics.median(waits),
            max(waits),
            statistics.median(clients),
            max(clients),
            top.uploaded,
            top.name,
            origin_gets,
            max(self.depth.values()),
            self.tracker.fallbacks,
            self.engine.events,
            wall,
            waits,
        )


def simulate(p: Params) -> Outcome:
    """Run one simulation to its end (deterministic: same inputs, same outcome)."""
    if p.n < 1 or p.k < 0 or p.model not in MODELS:
        raise ValueError(f"simulate: n ≥ 1, k ≥ 0 and a model of {sorted(MODELS)} ({p})")
    return Run(p).play()
