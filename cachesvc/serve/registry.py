"""The services ``cachesvc`` can run, found by name: the entry points of the
group ``cachesvc.services`` (pyproject.toml), each an :class:`AppFactory`.
Builds nothing and runs nothing.

Why entry points: the agent's routes live in ``node_agent``, which imports
``cachesvc``; finding it by name keeps imports one way (a contract in
pyproject.toml). A service is loaded only when about to run: ``cachesvc
--help`` imports none.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points
from typing import Protocol, cast

from aiohttp import web

from cachesvc.config import Settings
from cachesvc.errors import ConfigError
from cachesvc.tier import Role

GROUP = "cachesvc.services"
AGENT = Role.AGENT.value  # a service's entry point is named for its role
PEER = Role.PEER.value


class AppFactory(Protocol):
    """Makes a service's app from its settings; nothing opens or listens
    until the app is started (its ``cleanup_ctx`` opens the store, ...)."""

    def __call__(self, settings: Settings, /) -> web.Application: ...


def load_service(name: str) -> AppFactory:
    """The app factory of service ``name`` (``agent``, ``peer``).

    Raises :class:`ConfigError` naming the entry point when no installed
    distribution declares it (an install older than pyproject.toml: reinstall),
    or when it does not load or is not callable.
    """
    point = _entry_point(name)
    try:
        factory = point.load()
    except (ImportError, AttributeError) as exc:
        why = f"entry point {point.value} does not load: {exc}"
        raise ConfigError(f"service {name}: {why}") from exc
    if not callable(factory):
        raise ConfigError(f"service {name}: entry point {point.value} is not callable")
    return cast(AppFactory, factory)


def _entry_point(name: str) -> EntryPoint:
    found = entry_points(group=GROUP, name=name)
    if not found:
        raise ConfigError(
            f"service {name}: no entry point {name!r} in group {GROUP!r}; "
            "is cachesvc installed (pip install -e .)?"
        )
    return next(iter(found))
