"""``python -m loadtest run --quick``: every scenario against the origin, nginx
and cachesvc on a real local stack (moto, counting proxy, 3 peers, 2 agents,
nginx), in one run of well under a minute.

The run is started once for the module; each test reads what it wrote. Where
nginx is not on PATH and cannot be installed (not root, or no apt-get), the run
leaves the nginx baseline out and only the nginx tests skip, with that reason:
``make test`` passes for a user without root and without nginx. The last two
tests check exactly that, by running this file's nginx tests in a child pytest
as such a user.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from loadtest.nginx import nginx_binary
from loadtest.tools import ToolUnavailable

pytestmark = pytest.mark.slow  # real load-test runs

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ("hit", "storm", "waves", "burst", "warm")
TARGETS = ("origin", "nginx", "cachesvc")
NOBODY = 65534
THIS = "tests/tools/test_loadtest_functional.py"
# The nginx tests, as a child pytest selects them.
NGINX_TESTS = (
    f"{THIS}::test_cold_storm_costs_one_origin_get_through_nginx",
    f"{THIS}::test_quick_scenario_writes_csvs_and_has_no_errors_against[nginx-storm]",
)


@pytest.fixture(scope="module")
def nginx_missing() -> str | None:
    """Why the nginx baseline cannot run here (None: it can). Installs nginx
    first when it is missing and we may, as the load test itself would."""
    try:
        nginx_binary()
    except ToolUnavailable as exc:
        return str(exc)
    return None


@pytest.fixture
def nginx(nginx_missing: str | None) -> None:
    if nginx_missing is not None:
        pytest.skip(f"the nginx baseline cannot run here: {nginx_missing}")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory, nginx_missing: str | None) -> Path:
    out = tmp_path_factory.mktemp("loadtest") / "run"
    argv = [sys.executable, "-m", "loadtest", "run", "--quick", "--out", str(out)]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    if nginx_missing is not None:
        assert "leaving out the nginx baseline" in proc.stderr
    return out


def run_for(request: pytest.FixtureRequest, target: str) -> Path:
    """The quick run, once the target is known to be runnable here. The skip
    comes first, so a skipped nginx test never starts the run (as a fixture
    argument, the module-scoped run would be set up before a function-scoped
    skip)."""
    if target == "nginx":
        request.getfixturevalue("nginx")
    run: Path = request.getfixturevalue("quick_run")
    return run


def results(run: Path) -> dict[str, dict[str, Any]]:
    data: dict[str, dict[str, Any]] = json.loads((run / "results.json").read_text())
    return data


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_quick_scenario_writes_its_report_and_plot(quick_run: Path, scenario: str) -> None:
    assert f"## {scenario}\n" in (quick_run / "report.md").read_text()
    png = quick_run / scenario / "latency.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("target", TARGETS)
def test_quick_scenario_writes_csvs_and_has_no_errors_against(
    request: pytest.FixtureRequest, target: str, scenario: str
) -> None:
    run = run_for(request, target)
    assert (run / scenario / f"{target}_stats.csv").stat().st_size > 0
    assert (run / scenario / f"{target}_samples.csv").stat().st_size > 0
    figures = results(run)[scenario][target]
    assert figures["errors"] == 0, figures["notes"]
    assert figures["fetches"] > 0


def test_cold_storm_costs_one_origin_get_through_cachesvc(quick_run: Path) -> None:
    storm = results(quick_run)["storm"]
    assert storm["cachesvc"]["origin_gets"] == 1
    assert storm["origin"]["origin_gets"] == storm["origin"]["fetches"] == 10


def test_cold_storm_costs_one_origin_get_through_nginx(request: pytest.FixtureRequest) -> None:
    assert results(run_for(request, "nginx"))["storm"]["nginx"]["origin_gets"] == 1


def test_traffic_after_a_tenant_warm_is_served_from_l1(quick_run: Path) -> None:
    warm = results(quick_run)["warm"]["cachesvc"]
    assert warm["warm_s"] is not None
    assert warm["tiers"] == f"L1 {warm['fetches']}"
    assert warm["origin_gets"] == warm["distinct"]  # the warm's own fills, once each


# --- without root, without nginx ----------------------------------------------------


def child_pytest(tmp_path: Path, user: list[str]) -> subprocess.CompletedProcess[str]:
    """This file's nginx tests in a child pytest run by ``user`` (a prefix of
    argv), with only the venv on PATH: no nginx and no apt-get there."""
    venv_bin = str(Path(sys.executable).parent)
    assert shutil.which("nginx", path=venv_bin) is None
    home = tmp_path / "home"
    home.mkdir()
    if user:
        os.chown(home, NOBODY, NOBODY)
    env = {"PATH": venv_bin, "HOME": str(home), "PYTHONDONTWRITEBYTECODE": "1"}
    argv = [*user, sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--noconftest", "-rs"]
    argv += ["--basetemp", str(home / "pytest"), *NGINX_TESTS]
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def unprivileged() -> list[str]:
    """An argv prefix that runs a command as uid 65534 (nothing when we are not
    root). It keeps CAP_DAC_READ_SEARCH so the child can read a root-owned
    venv; it is still not root, which is what decides whether apt-get may run."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: cannot run a child as a non-root user")
    caps = ["--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]
    return [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *caps]


def assert_nginx_tests_skipped(done: subprocess.CompletedProcess[str], reason: str) -> None:
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert f"{len(NGINX_TESTS)} skipped" in out and "passed" not in out, out[-3000:]
    assert f"the nginx baseline cannot run here: nginx is not on PATH: {reason}" in out, out


def test_without_root_and_nginx_the_nginx_tests_skip_saying_why(tmp_path: Path) -> None:
    user = unprivileged()
    done = child_pytest(tmp_path, user)
    uid = NOBODY if user else os.geteuid()
    assert_nginx_tests_skipped(done, f"installing needs root (running as uid {uid})")


def test_as_root_without_apt_get_and_nginx_the_nginx_tests_skip_saying_why(
    tmp_path: Path,
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: the test above covers a user without root")
    done = child_pytest(tmp_path, [])
    assert_nginx_tests_skipped(done, "apt-get is not available")


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
    from PIL import Image, PngImagePlugin

    from loadtest.plot import tier_class

    with Image.open(quick_run / scenario / "latency.png") as png:
        assert isinstance(png, PngImagePlugin.PngImageFile)
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
