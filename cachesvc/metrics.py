"""Every ``cachesvc_*`` Prometheus metric, defined once per service instance, in
that instance's own registry (several services may share a process: tests,
``cachesvc up``).

Labels take values from fixed sets only (tiers, upstreams, routes, signals,
``found_by``, outcomes, job states, error codes, the ``--runtime`` names an
operator gave); digests, peers and tenants go in log lines, except the
per-tenant warm counter, capped at :data:`MAX_TENANT_LABELS` tenants (then
``tenant="_other"``).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

MAX_TENANT_LABELS = 50
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "cachesvc_requests",
            "Package requests served, by where the bytes came from",
            ["tier"],
            registry=r,
        )
        self.bytes_served = Counter(
            "cachesvc_bytes_served", "Body bytes sent, by tier", ["tier"], registry=r
        )
        self.fast_hits = Counter(
            "cachesvc_fast_hits",
            "L1 hits answered on the fast path, without the web framework "
            "(also counted in cachesvc_requests_total)",
            registry=r,
        )
        self.upload_bytes = Counter(
            "cachesvc_upload_bytes",
            "Body bytes sent to other cachesvc hosts (peer to agent, agent to agent), "
            "apart from bytes served to local clients",
            registry=r,
        )
        self.fanout_redirects = Counter(
            "cachesvc_fanout_redirects",
            "Requests the tracker sent to another host holding or filling the package",
            registry=r,
        )
        self.upstream_fetches = Counter(
            "cachesvc_upstream_fetches",
            "Upstream fetch attempts",
            ["upstream", "outcome"],
            registry=r,
        )
        self.coalesced = Counter(
            "cachesvc_coalesced", "Requests that joined a fetch already running", registry=r
        )
        self.digest_mismatch = Counter(
            "cachesvc_digest_mismatch",
            "Upstream bodies refused: bytes did not match the digest",
            registry=r,
        )
        self.negative_hits = Counter(
            "cachesvc_negative_cache_hits",
            "Requests answered 404 from the negative cache",
            registry=r,
        )
        self.overloaded = Counter(
            "cachesvc_overloaded", "Requests shed with 503 overloaded", registry=r
        )
        self.evictions = Counter(
            "cachesvc_evictions", "Packages evicted from the store", registry=r
        )
        self.cache_bytes = Gauge("cachesvc_cache_bytes", "Bytes in the store", registry=r)
        self.cache_entries = Gauge("cachesvc_cache_entries", "Packages in the store", registry=r)
        self.cache_capacity = Gauge(
            "cachesvc_cache_capacity_bytes", "Configured store capacity", registry=r
        )
        self.inflight = Gauge(
            "cachesvc_inflight_fetches", "Upstream fetches running now", registry=r
        )
        self.request_seconds = Histogram(
            "cachesvc_request_seconds",
            "Time to answer a request (to the last byte)",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.warm_jobs = Counter(
            "cachesvc_warm_jobs", "Warm jobs finished, by final state", ["state"], registry=r
        )
        self.warm_items = Counter(
            "cachesvc_warm_items", "Warm items, by outcome", ["outcome"], registry=r
        )
        self.warm_bytes = Counter("cachesvc_warm_bytes", "Bytes fetched by warm jobs", registry=r)
        self.tenant_warm_items = Counter(
            "cachesvc_tenant_warm_items",
            "Warm items per tenant (bounded cardinality)",
            ["tenant"],
            registry=r,
        )
        self.prefetches = Counter(
            "cachesvc_prefetches",
            "Background prefetches started, by the signal behind them",
            ["signal"],
            registry=r,
        )
        self.prefetch_dropped = Counter(
            "cachesvc_prefetch_dropped",
            "Prefetch signals dropped because the prefetch queue was full",
            registry=r,
        )
        self.references = Gauge(
            "cachesvc_references",
            "Package references known to this service's reference index",
            registry=r,
        )
        self.unpacks = Counter(
            "cachesvc_unpacks", "Package extractions, by outcome", ["outcome"], registry=r
        )
        self.bytecode_files = Counter(
            "cachesvc_bytecode_files",
            "Sources an agent compiled for its host's runtimes (--runtime), by outcome: "
            "compiled, or skipped (a syntax error, over a limit, a compiler that crashed)",
            ["runtime", "outcome"],
            registry=r,
        )
        self.corrupt = Counter(
            "cachesvc_corrupt",
            "Stored entries dropped because their bytes on disk were wrong or unreadable",
            ["found_by"],
            registry=r,
        )
        self.scrub_bytes = Counter(
            "cachesvc_scrub_bytes", "Bytes re-hashed by the background scrubber", registry=r
        )
        self.scrub_passes = Counter(
            "cachesvc_scrub_passes", "Full scrub passes over the store finished", registry=r
        )
        self.scrub_last_pass = Gauge(
            "cachesvc_scrub_last_pass_timestamp_seconds",
            "When the last full scrub pass finished (Unix time)",
            registry=r,
        )
        self.scrub_pass_seconds = Gauge(
            "cachesvc_scrub_last_pass_seconds", "How long the last full scrub pass took", registry=r
        )
        self._tenants: set[str] = set()
        self.on_sync: list[Callable[[], None]] = []

    def tenant_label(self, tenant: str) -> str:
        if tenant in self._tenants or len(self._tenants) < MAX_TENANT_LABELS:
            self._tenants.add(tenant)
            return tenant
        return "_other"

    def bind_store(self, usage: Callable[[], tuple[int, int, int]]) -> None:
        """Read store gauges at scrape time: ``usage() -> (entries, bytes, capacity)``."""
        self.cache_entries.set_function(lambda: usage()[0])
        self.cache_bytes.set_function(lambda: usage()[1])
        self.cache_capacity.set_function(lambda: usage()[2])

    def requests_served(self, tier: str) -> int:
        """``cachesvc_requests_total`` for ``tier`` as the registry reports it
        (call :meth:`sync` first to include the fast path's tallies)."""
        value = self.registry.get_sample_value("cachesvc_requests_total", {"tier": tier})
        return int(value or 0)

    def sync(self) -> None:
        """Bring in counts kept elsewhere for speed (the fast path's tallies)."""
        for flush in self.on_sync:
            flush()

    def render(self) -> bytes:
        self.sync()
        return generate_latest(self.registry)


def observe_many(histogram: Histogram, values: list[float]) -> None:
    """``histogram.observe(v)`` for every value, in one pass: the values are
    counted per bucket here, then each bucket is incremented once.

    Uses the client's histogram internals (``_upper_bounds``, ``_buckets``,
    ``_sum``, unchanged since prometheus_client 0.4); without them it falls
    back to one ``observe`` per value.
    """
    # No public API observes many values at once: see the docstring for the fallback.
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for value in values:
            histogram.observe(value)
        return
    counts = [0] * len(bounds)
    for value in values:
        counts[bisect.bisect_left(bounds, value)] += 1
    total.inc(sum(values))
    for bucket, count in zip(buckets, counts, strict=True):
        if count:
            bucket.inc(count)
