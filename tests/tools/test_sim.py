"""The fan-out simulator: the tracker's choices, closed forms, and agreement
with a deliberately naive time-stepped model of the same policy."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest

from sim.__main__ import main as sim_main
from sim.__main__ import parse_bandwidth
from sim.model import MODELS, Params, arrivals, simulate
from sim.tracker import Tracker

MiB = 1 << 20
E = 100 * MiB  # bytes/s


# -- the tracker ---------------------------------------------------------------


def parents(tracker: Tracker, names: list[str], k: int) -> list[str]:
    return [tracker.assign(n, k).parent for n in names]


def test_tracker_assigns_breadth_first_in_join_order() -> None:
    tracker = Tracker("P", 2)
    names = [f"A{i}" for i in range(10)]
    assert parents(tracker, names, 2) == ["P", "P", "A0", "A0", "A1", "A1", "A2", "A2", "A3", "A3"]
    assert [tracker.depth_of(n) for n in names] == [1, 1, 2, 2, 2, 2, 3, 3, 3, 3]


def test_tracker_caps_each_member_at_its_own_k() -> None:
    tracker = Tracker("P", 1)
    assert parents(tracker, ["A", "B", "C", "D", "E"], 3) == ["P", "A", "A", "A", "B"]
    assert tracker.fallbacks == 0


def test_with_k_zero_the_owner_serves_everyone_and_nobody_joins() -> None:
    tracker = Tracker("P", 0)
    assert parents(tracker, ["A", "B", "C"], 0) == ["P", "P", "P"]
    assert tracker.fallbacks == 3 and [m.name for m in tracker.members] == ["P"]


def test_tracker_skips_avoided_members_and_falls_back_to_the_owner() -> None:
    tracker = Tracker("P", 1)
    parents(tracker, ["A", "B"], 1)  # P → A → B
    pick = tracker.assign("C", 1, avoid={"B"})
    assert (pick.parent, pick.fallback) == ("P", True)
    assert tracker.assign("D", 1, avoid={"P"}).parent == "B"  # B joined before C
    assert tracker.assign("E", 1).parent == "C"


def test_a_resuming_member_is_never_given_its_own_descendant() -> None:
    tracker = Tracker("P", 1)
    parents(tracker, ["A", "B", "C"], 2)  # P → A → B, C; B and C have room
    pick = tracker.assign("A", 2, avoid={"P"})  # A's parent failed; its subtree must not feed it
    assert pick.fallback and pick.parent == "P"
    tracker.assign("D", 2)  # D joins under B
    assert tracker.assign("B", 2, avoid={"A"}).parent == "C"  # C is no descendant of B


def test_tracker_never_names_the_requester_and_skips_hosts_that_do_not_advertise() -> None:
    tracker = Tracker("P", 1)
    assert tracker.assign("A", 2).parent == "P"
    assert tracker.assign("A", 2).parent != "A"
    assert tracker.assign("X", 2, advertises=False).parent == "A"
    assert tracker.depth_of("X") is None


# -- arrival schedules ---------------------------------------------------------


def test_waves_bring_one_two_four_up_to_32_new_hosts_per_group_every_10_s() -> None:
    times = arrivals("waves", 126)  # two full groups of 63
    assert [times.count(10.0 * w) for w in range(6)] == [2, 4, 8, 16, 32, 64]
    assert arrivals("waves", 65)[:3] == [0.0, 0.0, 10.0]  # the partial group fills waves in order


def test_bursts_are_2_then_18_three_times_per_group_of_56() -> None:
    times = arrivals("burst", 56)
    assert [times.count(t) for t in (0.0, 3.0, 13.0, 23.0)] == [2, 18, 18, 18]
    assert arrivals("storm", 5) == [0.0] * 5


# -- closed forms --------------------------------------------------------------


def params(
    n: int,
    k: int,
    size: int = 20 * MiB,
    *,
    model: str = "storm",
    chunk: int = MiB,
    hop_latency: float = 0.001,
    origin_latency: float = 0.01,
    egress: float = E,
) -> Params:
    return Params(
        n=n,
        size=size,
        k=k,
        model=model,
        chunk=chunk,
        hop_latency=hop_latency,
        origin_latency=origin_latency,
        egress=egress,
    )


def test_solo_is_size_over_egress_plus_latencies_and_one_chunk() -> None:
    out = simulate(params(1, 2))
    # the request reaches P, then the origin's first byte; the bytes at E
    # (origin, P and A pipelined); P forwards chunk i after holding it, so A
    # holds everything one chunk time after P.
    assert out.time_to_all == pytest.approx(0.001 + 0.01 + 20 * MiB / E + MiB / E, rel=1e-9)
    assert out.origin_gets == 1 and out.largest_upload == 20 * MiB


def test_a_redirect_costs_two_round_trips_before_the_first_byte() -> None:
    chunk = 64 * 1024  # P → A0 → A1; A0 holds long before A1's request reaches it
    out = simulate(params(2, 1, size=chunk, chunk=chunk, hop_latency=0.1, origin_latency=0))
    # P's fill starts when A0's request reaches it (0.1 s); A1 asks P, then A0.
    assert out.waits == pytest.approx([0.1 + 2 * chunk / E, 0.2 + chunk / E], rel=1e-9)


def test_owner_only_storm_takes_n_times_size_over_egress() -> None:
    n = 30
    out = simulate(params(n, 0))
    assert out.time_to_all == pytest.approx(n * 20 * MiB / E, rel=0.02)
    assert out.largest_upload == n * 20 * MiB and out.depth == 1 and out.fallbacks == n


def test_k1_chain_takes_two_sizes_plus_one_shared_chunk_time_per_hop() -> None:
    n = 20  # local clients share each agent's egress: every hop runs at E/2
    out = simulate(params(n, 1))
    chunk_time = MiB / (E / 2)
    assert out.depth == n
    assert out.time_to_all == pytest.approx(2 * 20 * MiB / E + n * chunk_time, rel=0.05)


@pytest.mark.parametrize(("n", "k"), [(100, 2), (500, 3), (1000, 2), (80, 4)])
def test_storm_tree_depth_is_log_k_n_and_time_is_k_plus_one_sizes_plus_depth_chunks(
    n: int, k: int
) -> None:
    out = simulate(params(n, k, size=8 * MiB))
    # P and N agents fill a complete K-ary tree level by level: d + 1 levels
    # hold (K^(d+1) - 1) / (K - 1) hosts, so the depth is about log_K N.
    levels = next(d for d in range(64) if (k ** (d + 1) - 1) // (k - 1) >= n + 1)
    assert out.depth == levels <= math.log(n, k) + 1
    chunk_time = MiB / (E / (k + 1))
    bound = (k + 1) * 8 * MiB / E + out.depth * (chunk_time + 2 * 0.001) + 0.01
    assert (k + 1) * 8 * MiB / E < out.time_to_all <= bound * 1.05
    assert out.largest_upload == k * 8 * MiB  # P and inner agents feed exactly K each


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("k", [0, 2])
def test_every_model_costs_exactly_one_origin_get(model: str, k: int) -> None:
    out = simulate(params(130, k, size=2 * MiB, model=model))
    assert out.origin_gets == 1
    assert out.wait_max >= out.wait_p50 > 0


# -- agreement with a naive model ---------------------------------------------


@dataclass
class Flow:
    """One upload of the stepped model: ``sent`` bytes so far from ``sender``
    to ``receiver`` (None: the sender's own client), from time ``start``."""

    sender: str
    receiver: str | None
    start: float
    sent: float = 0.0


def stepped(p: Params, dt: float) -> float:
    """The same policy advanced in fixed steps of ``dt`` (no events, no virtual
    clocks): each host splits its egress equally among uploads whose sender
    holds more whole chunks than the upload has sent. Returns time-to-all."""
    size, chunk, t = p.size, p.chunk, 0.0
    have: dict[str, float] = {"origin": float(size), "P": 0.0}
    flows: list[Flow] = []
    tracker = Tracker("P", p.k)
    for i, when in enumerate(arrivals(p.model, p.n)):
        name = f"A{i}"
        have[name] = 0.0
        parent = tracker.assign(name, p.k).parent
        latency = p.hop_latency * (1 if parent == "P" else 2)
        flows += [Flow(parent, name, when + latency), Flow(name, None, when + p.local_latency)]
        if i == 0:
            flows.append(Flow("origin", "P", when + p.hop_latency + p.origin_latency))

    def ready(host: str) -> float:  # bytes of whole chunks held
        h = have[host]
        return float(size) if h >= size else math.floor(h / chunk + 1e-9) * chunk

    for _ in range(10_000_000):
        if all(have[h] >= size for h in have if h.startswith("A")):
            return t
        active: dict[str, list[Flow]] = {}
        for f in flows:
            if t >= f.start and f.sent < ready(f.sender):
                active.setdefault(f.sender, []).append(f)
        for host, fs in active.items():
            rate = (p.origin_bandwidth or p.egress) if host == "origin" else p.egress
            for f in fs:
                f.sent += min(rate / len(fs) * dt, ready(host) - f.sent)
        for f in flows:
            if f.receiver is not None:
                have[f.receiver] = max(have[f.receiver], f.sent)
        t += dt
    raise AssertionError("stepped model did not finish")


@pytest.mark.parametrize(
    ("n", "k", "model", "egress"),
    [
        (9, 2, "storm", E),
        (6, 0, "storm", E),
        (12, 1, "storm", E),
        (7, 3, "waves", E),
        # 6 s per package: bursts arrive mid-transfer, so uploads of one host
        # are out of phase and the equal sharing itself is what is compared.
        (24, 0, "burst", MiB),
        (24, 2, "burst", MiB),
    ],
)
def test_event_engine_agrees_with_a_time_stepped_model(
    n: int, k: int, model: str, egress: float
) -> None:
    p = params(n, k, size=6 * MiB, chunk=MiB // 2, model=model, egress=egress)
    out = simulate(p)
    dt = (p.chunk / p.egress) / 40
    assert out.time_to_all == pytest.approx(stepped(p, dt), rel=0.02, abs=2 * dt * n)


# -- the command ---------------------------------------------------------------


@pytest.mark.slow
def test_sim_command_writes_json_table_and_a_log_log_plot(tmp_path: Path) -> None:
    argv = ["--n", "10,40", "--size", "2MiB", "--k", "0,2", "--model", "storm,burst"]
    assert sim_main([*argv, "--bandwidth", "1Gbit", "--out", str(tmp_path)]) == 0
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert len(runs) == 8 and {r["origin_gets"] for r in runs} == {1}
    owner_only = next(r for r in runs if (r["model"], r["n"], r["k"]) == ("storm", 40, 0))
    tree = next(r for r in runs if (r["model"], r["n"], r["k"]) == ("storm", 40, 2))
    assert owner_only["ratio_to_solo"] > 10 > 4 > tree["ratio_to_solo"]
    assert owner_only["largest_upload_pkgs"] == 40 and tree["largest_upload_pkgs"] == 2
    table = (tmp_path / "table.md").read_text()
    assert "### storm" in table and "### burst" in table and "| 40 | 2 MiB | 2 |" in table
    assert (tmp_path / "fanout.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("text", "rate"),
    [("10Gbit", 1.25e9), ("25Gbps", 3.125e9), ("100Mbit/s", 12.5e6), ("40MiB", 40 * MiB)],
)
def test_bandwidths_take_bits_or_bytes_per_second(text: str, rate: float) -> None:
    assert parse_bandwidth(text) == rate
