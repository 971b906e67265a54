"""Metrics helpers without sockets."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from cachesvc.metrics import LATENCY_BUCKETS, Metrics, observe_many


def exposition(registry: CollectorRegistry) -> list[str]:
    return [
        line for line in generate_latest(registry).decode().splitlines() if "created" not in line
    ]


def test_observe_many_equals_one_observe_per_value() -> None:
    values = [0.0, 0.0005, 0.001, 0.0011, 0.05, 0.1, 0.25, 59.9, 60.0, 61.0, 1e9]
    one, many = CollectorRegistry(), CollectorRegistry()
    h_one = Histogram("x", "x", ["route"], buckets=LATENCY_BUCKETS, registry=one)
    h_many = Histogram("x", "x", ["route"], buckets=LATENCY_BUCKETS, registry=many)
    for value in values:
        h_one.labels("pkg").observe(value)
    observe_many(h_many.labels("pkg"), values)
    assert exposition(one) == exposition(many)
    assert any('le="+Inf"' in line and line.endswith(" 11.0") for line in exposition(many))


def test_requests_served_counts_each_tier_and_zero_for_a_tier_never_served() -> None:
    metrics = Metrics()
    metrics.requests.labels("L1").inc(3)
    metrics.requests.labels("ORIGIN").inc()
    assert [metrics.requests_served(t) for t in ("L1", "L2", "ORIGIN")] == [3, 0, 1]
