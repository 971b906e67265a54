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
