"""``python -m loadtest fanout``: the emulation harness on real processes
(moto, the counting proxy, 3 peers, 3 agents), its storm client against a
server that lies, and its checks."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from aiohttp import web

from loadtest.fanout_report import Row, checks, predict
from loadtest.hashstorm import Fetch, storm
from loadtest.origin_proxy import start_server

pytestmark = pytest.mark.slow  # 8 real agent processes

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20


def test_quick_emulation_holds_everywhere_with_one_origin_get_and_good_bodies(
    tmp_path: Path,
) -> None:
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "loadtest", "fanout", "--n", "3", "--k", "0"]
    argv += ["--size", "1MiB", "--out", str(out)]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run,) = json.loads((out / "results.json").read_text())["runs"]
    assert (run["n"], run["k"], run["origin_gets"], run["bad_bodies"]) == (3, 0, 1, 0)
    assert run["holds_from"] == ["store"]  # read from each agent's blob file
    assert len(run["holds_s"]) == 3 and all(0 < t < 60 for t in run["holds_s"])
    assert 0 < run["solo_s"] < 60 and run["largest_upload_pkgs"] >= 3  # the owner fed all
    report = (out / "report.md").read_text()
    assert "| N | K | solo |" in report and "- PASS N=3 K=0: 1 origin GET" in report


def test_eight_agent_processes_with_fanout_2_feed_each_other_at_one_origin_get(
    tmp_path: Path,
) -> None:
    """Real cachesvc processes (3 peers, 8 agents), K = 2: one origin GET,
    every body right, agents served by other agents, no host past K packages."""
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "loadtest", "fanout", "--n", "8", "--k", "2"]
    argv += ["--size", "2MiB", "--egress-limit", "16MiB", "--out", str(out)]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run,) = json.loads((out / "results.json").read_text())["runs"]
    assert (run["n"], run["k"], run["origin_gets"], run["bad_bodies"]) == (8, 2, 1, 0)
    assert run["agent_upload"] >= 2 * MiB  # at least one agent fed another a whole package
    assert run["largest_upload_pkgs"] <= 2.0 + 1e-9  # K = 2: nobody fed more than two


async def test_storm_client_counts_wrong_short_and_refused_bodies_as_bad() -> None:
    body = b"package bytes " * 5000
    good = hashlib.sha256(body).hexdigest()

    async def right(_: web.Request) -> web.Response:
        return web.Response(body=body)

    async def wrong(_: web.Request) -> web.Response:
        return web.Response(body=body[:-1] + b"!")

    async def short(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": str(len(body))})
        await resp.prepare(request)
        await resp.write(body[:1000])
        assert request.transport is not None
        request.transport.abort()
        return resp

    app = web.Application()
    for path, handler in (("/right", right), ("/wrong", wrong), ("/short", short)):
        app.router.add_get(path, handler)
    runner, url = await start_server(app)
    port = int(url.rsplit(":", 1)[1])
    try:
        paths = ("/right", "/wrong", "/short", "/missing")
        result = await storm([Fetch(port, p, good) for p in paths], timeout=30)
    finally:
        await runner.cleanup()
    assert [f.good for f in result.fetches] == [True, False, False, False]
    assert result.bad == 3
    right_f, wrong_f, short_f, missing_f = result.fetches
    assert right_f.received == len(body) and right_f.ttfb <= right_f.total
    assert "not" in wrong_f.error and "body of 1000" in short_f.error
    assert missing_f.status == 404


def row(n: int, k: int, holds: float, solo: float, upload_pkgs: float) -> Row:
    return Row(
        n=n,
        k=k,
        size=16 * MiB,
        egress=40 * MiB,
        solo_s=solo,
        holds_s=[holds / 2, holds],
        holds_from=["store"],
        client_s=[holds, holds],
        origin_gets=1,
        largest_upload=int(upload_pkgs * 16 * MiB),
        uploader="peer-0",
        upload_from="cachesvc_upload_bytes_total",
        bad_bodies=0,
        errors=[],
        calibration={"hop_latency_s": 0.002, "origin_ttfb_s": 0.01, "origin_Bps": 500 * MiB},
    )


def test_checks_flag_a_slow_storm_a_heavy_uploader_and_a_wrong_prediction() -> None:
    fast, slow = row(16, 2, 1.5, 0.45, 2), row(16, 2, 2.0, 0.45, 6)
    fast.sim = {"hold_max_s": 1.6}
    slow.sim = {"hold_max_s": 1.0}
    verdicts = [ok for _, ok in checks([fast, slow], default_k=2)]
    # per row: origin GET and bodies, ratio to solo, largest upload, simulator error
    assert verdicts == [True, True, True, True, True, False, False, False]


def test_prediction_for_owner_only_is_n_times_solo_and_for_k2_within_4x() -> None:
    owner_only, tree = predict(row(16, 0, 1, 1, 0)), predict(row(16, 2, 1, 1, 0))
    assert owner_only["hold_max_s"] > 0.9 * 16 * 16 / 40  # N × S / E
    assert tree["hold_max_s"] < 4 * tree["solo_s"] and tree["largest_upload_pkgs"] == 2
