"""Why each target's figures look the way they do: one line per target and
scenario for the load-test report, built from the run's own counts.

Most of a baseline's shape follows from what it *is*: origin direct has no
cache, so every fetch is an origin GET; nginx's ``proxy_cache_lock`` makes the
followers of a fill wait for the whole object before their first byte;
cachesvc's followers stream the growing file. The lines say that, with the
numbers of this run, so a reader need not know the stack to read the table.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loadtest.report import Figures

MiB = 1 << 20
COLD = ("storm", "waves", "burst")  # every fetch is a new instance's cold start


def why(scenario: str, rows: list[Figures]) -> list[str]:
    """One line per target that has an explanation, in the rows' order."""
    return [WHY[f.target](scenario, f) for f in rows if f.target in WHY]


def _origin(scenario: str, f: Figures) -> str:
    first = "nothing to warm, and " if scenario == "warm" else ""
    return (
        f"origin direct: {first}no cache: each of the {f.fetches} fetches is its own origin "
        f"GET ({f.origin_gets} GETs, {f.origin_bytes / MiB:.0f} MiB read), so concurrent "
        "fetches share the store's disk and the loopback and latency grows with concurrency."
    )


def _nginx(scenario: str, f: Figures) -> str:
    gets = f"nginx: {f.origin_gets} origin GET(s) for {f.distinct} package(s)"
    if scenario in COLD:
        return (
            f"{gets}. `proxy_cache_lock` lets one request fill the cache (the MISS) while the "
            "others wait for the *whole* object before their first byte, re-checking the lock "
            "every 500 ms (nginx's fixed poll): its followers are counted as HITs but finish "
            f"after the fill, rounded up to the next poll ({_p50s(f)})."
        )
    warmed = f" (warmed first by one GET per package, {f.warm_s:.2f} s)" if f.warm_s else ""
    return (
        f"{gets}{warmed}: a package's first request is a miss filled under "
        "`proxy_cache_lock`, the rest hit its disk cache."
    )


def _p50s(f: Figures) -> str:
    """ "p50: HIT 559 ms, MISS 54 ms" from the run's split by tier."""
    return "p50: " + ", ".join(f"{tier} {p50:.0f} ms" for tier, _n, p50, _p99 in f.by_tier)


def _cachesvc(scenario: str, f: Figures) -> str:
    gets = f"cachesvc: {f.origin_gets} origin GET(s) for {f.distinct} package(s)"
    if f.warm_s is not None:
        return (
            f"{gets}, made by `POST /warm` on each agent before the traffic "
            f"({f.warm_s:.2f} s), so the traffic is served by {f.tiers}."
        )
    return (
        f"{gets}: a miss walks L1 → the owner peer (L2) → the origin once, and the requests "
        "that join a running fill stream the growing file as it arrives (no wait for the "
        f"whole object); served by {f.tiers}."
    )


WHY: dict[str, Callable[[str, Figures], str]] = {
    "origin": _origin,
    "nginx": _nginx,
    "cachesvc": _cachesvc,
}
