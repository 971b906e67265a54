"""The services the command line runs are found by entry point: the two that
pyproject.toml declares resolve to the agent's and the peer's apps, and a
missing or broken one is a one-line ConfigError naming it."""

from __future__ import annotations

import tomllib
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from cachesvc.errors import ConfigError
from cachesvc.peer.app import make_app as make_peer
from cachesvc.serve.registry import AGENT, GROUP, PEER, load_service
from node_agent.app import make_app as make_agent

ROOT = Path(__file__).resolve().parents[2]


def test_the_entry_points_resolve_to_the_agent_and_the_peer_apps() -> None:
    assert load_service(AGENT) is make_agent
    assert load_service(PEER) is make_peer


def test_the_installed_entry_points_are_the_ones_pyproject_declares() -> None:
    """An install older than pyproject.toml would run stale services."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    installed = {point.name: point.value for point in entry_points(group=GROUP)}
    assert (
        installed
        == declared[GROUP]
        == {
            AGENT: "node_agent.app:make_app",
            PEER: "cachesvc.peer.app:make_app",
        }
    )


def test_a_service_no_distribution_declares_is_refused_naming_its_entry_point() -> None:
    with pytest.raises(ConfigError) as caught:
        load_service("nope")
    assert str(caught.value).startswith(
        "service nope: no entry point 'nope' in group 'cachesvc.services'"
    )


def test_an_entry_point_that_does_not_load_is_refused_naming_its_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real (if tiny) installed distribution on sys.path declares a broken service."""
    dist = tmp_path / "broken_services-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-services\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[{GROUP}]\nbroken = no_such_module_here:make_app\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=r"^service broken: entry point no_such_module_here:"):
        load_service("broken")
