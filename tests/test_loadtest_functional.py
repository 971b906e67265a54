"""``python -m loadtest run --quick``: every scenario against the origin, nginx
and cachesvc on a real local stack (moto, counting proxy, 3 peers, 2 agents,
nginx), in one run of well under a minute.

The run is started once for the module; each test reads what it wrote.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ("hit", "storm", "waves", "burst", "warm")
TARGETS = ("origin", "nginx", "cachesvc")

pytestmark = pytest.mark.skipif(
    shutil.which("nginx", path="/usr/sbin:/usr/bin:/sbin:/bin") is None
    and shutil.which("apt-get") is None,
    reason="nginx is not installed and cannot be (no apt-get)",
)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("loadtest") / "run"
    argv = [sys.executable, "-m", "loadtest", "run", "--quick", "--out", str(out)]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out


def results(run: Path) -> dict[str, dict[str, Any]]:
    data: dict[str, dict[str, Any]] = json.loads((run / "results.json").read_text())
    return data


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_quick_scenario_writes_its_report_plot_and_csvs(quick_run: Path, scenario: str) -> None:
    assert f"## {scenario}\n" in (quick_run / "report.md").read_text()
    png = quick_run / scenario / "latency.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for target in TARGETS:
        assert (quick_run / scenario / f"{target}_stats.csv").stat().st_size > 0
        assert (quick_run / scenario / f"{target}_samples.csv").stat().st_size > 0


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_quick_scenario_fetches_every_package_without_errors(
    quick_run: Path, scenario: str
) -> None:
    for target, figures in results(quick_run)[scenario].items():
        assert figures["errors"] == 0, (target, figures["notes"])
        assert figures["fetches"] > 0, target


def test_cold_storm_costs_one_origin_get_through_either_cache(quick_run: Path) -> None:
    storm = results(quick_run)["storm"]
    assert storm["cachesvc"]["origin_gets"] == 1
    assert storm["nginx"]["origin_gets"] == 1
    assert storm["origin"]["origin_gets"] == storm["origin"]["fetches"] == 10


def test_traffic_after_a_tenant_warm_is_served_from_l1(quick_run: Path) -> None:
    warm = results(quick_run)["warm"]["cachesvc"]
    assert warm["warm_s"] is not None
    assert warm["tiers"] == f"L1 {warm['fetches']}"
    assert warm["origin_gets"] == warm["distinct"]  # the warm's own fills, once each


# -- the report reads without its author -------------------------------------------


def report_section(run: Path, scenario: str) -> str:
    text = (run / "report.md").read_text()
    return text.split(f"## {scenario}\n", 1)[1].split("\n## ", 1)[0]


def test_a_quick_report_says_it_is_quick_in_its_title_settings_and_tables(quick_run: Path) -> None:
    text = (quick_run / "report.md").read_text()
    assert text.splitlines()[0].endswith("(QUICK run: not for figures)")
    for scenario in SCENARIOS:
        section = report_section(quick_run, scenario)
        assert "| run | quick (small packages, seconds-long runs: not for figures) |" in section
        table = section.split("| target | fetches |", 1)[1].split("\n\n", 1)[0]
        rows = table.splitlines()[2:]  # after the header's rest and the rule
        assert [row.split(" | ", 1)[0] for row in rows] == [f"| {t}" for t in TARGETS]
        assert all(row.endswith("| quick |") for row in rows), rows


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_each_scenario_states_the_settings_it_ran_with(quick_run: Path, scenario: str) -> None:
    from loadtest.scenarios import scenarios

    sc = scenarios(quick=True)[scenario]
    section = report_section(quick_run, scenario)
    assert f"| users and shape | {sc.shape()} |" in section
    assert f"| planned duration | {sc.run_s:g} s," in section
    assert f"| locust | `{sc.user} {' '.join(sc.args)}` |" in section
    assert f"| packages | {len(sc.sizes)}" in section
    targets = next(line for line in section.splitlines() if line.startswith("| targets |"))
    assert all(f"{t}: http://127.0.0.1:" in targets for t in TARGETS)
    assert "| origin | moto (an S3 mock" in section


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_each_scenario_says_why_each_target_looks_the_way_it_does(
    quick_run: Path, scenario: str
) -> None:
    section = report_section(quick_run, scenario)
    figures = results(quick_run)[scenario]
    origin = figures["origin"]
    assert f"- origin direct: {'nothing to warm, and ' if scenario == 'warm' else ''}no cache" in (
        section
    )
    assert f"each of the {origin['fetches']} fetches is its own origin GET" in section
    nginx, cachesvc = figures["nginx"], figures["cachesvc"]
    assert f"- nginx: {nginx['origin_gets']} origin GET(s) for {nginx['distinct']}" in section
    assert f"- cachesvc: {cachesvc['origin_gets']} origin GET(s) for {cachesvc['distinct']}" in (
        section
    )
    if scenario == "storm":
        assert "re-checking the lock every 500 ms" in section


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_each_plot_tells_hits_from_misses_and_draws_p50_and_p99(
    quick_run: Path, scenario: str
) -> None:
    from PIL import Image

    from loadtest.plot import tier_class

    with Image.open(quick_run / scenario / "latency.png") as png:
        title, shown = png.text["Title"], png.text["Description"]
    assert title.startswith(f"{scenario} (QUICK run): latency to last byte per fetch")
    panels = dict(part.split(": ", 1) for part in shown.split("; "))
    assert list(panels) == list(TARGETS)
    for target, figures in results(quick_run)[scenario].items():
        assert f"p50 {figures['p50']:.1f} ms" in panels[target]
        assert f"p99 {figures['p99']:.1f} ms" in panels[target]
        for tier, fetches, _p50, _p99 in figures["by_tier"]:
            assert f"{tier_class(tier)[0]} ({fetches})" in panels[target]
    if scenario == "hit":  # every package's first fetch is a miss, the rest hits
        assert (
            "hit: nginx's cache" in panels["nginx"] and "miss: from the origin" in panels["nginx"]
        )
        assert "hit: the agent's disk (L1)" in panels["cachesvc"]
