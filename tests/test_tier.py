"""Tier, Upstream and Role: the enums say exactly the contract's strings."""

from __future__ import annotations

import json
import logging

import pytest
from aiohttp import http_writer
from multidict import CIMultiDict

from cachesvc.metrics import Metrics
from cachesvc.tier import Role, Tier, Upstream


def test_the_tiers_and_upstreams_are_the_contracts_strings() -> None:
    assert [str(t) for t in Tier] == ["L1", "L2", "ORIGIN"]
    assert [str(u) for u in Upstream] == ["peer", "agent", "origin"]


@pytest.mark.parametrize("tier", list(Tier))
def test_a_tier_goes_on_the_wire_as_its_string_in_headers_json_and_logs(tier: Tier) -> None:
    head = http_writer._serialize_headers("HTTP/1.1 200 OK", CIMultiDict({"X-Cache-Tier": tier}))
    assert head == f"HTTP/1.1 200 OK\r\nX-Cache-Tier: {tier.value}\r\n\r\n".encode()
    assert json.dumps({tier: tier}) == f'{{"{tier.value}": "{tier.value}"}}'
    record = logging.LogRecord("x", logging.INFO, "", 0, "%s ready", (tier,), None)
    assert record.getMessage() == f"{tier.value} ready"


def test_metric_labels_of_an_enum_and_of_its_string_are_one_series() -> None:
    metrics = Metrics()
    metrics.requests.labels(Tier.L2).inc()
    metrics.requests.labels("L2").inc()
    metrics.upstream_fetches.labels(Upstream.AGENT, "ok").inc()
    text = metrics.render().decode()
    assert 'cachesvc_requests_total{tier="L2"} 2.0' in text
    assert 'upstream="agent"' in text


def test_an_agent_serves_its_own_store_as_l1_and_a_peer_as_l2() -> None:
    assert Role.AGENT.local_tier is Tier.L1
    assert Role.PEER.local_tier is Tier.L2
