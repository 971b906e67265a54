"""Start-up failures of real aiohttp apps on loopback: only a bind failure is a
listen error; a failing start names its path, and what had started is closed."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from cachesvc.errors import ConfigError
from cachesvc.serve.runner import run_until_signal
from tests.servers import free_port


def app_with(events: list[str], name: str, start_fails: Exception | Path | None) -> web.Application:
    """An app with two start-up steps, as a service has (origin, then store): the
    first always opens; the second may fail with a real OS error (making a
    directory where a file is) or raise ConfigError (as a dir lock would)."""
    app = web.Application()

    async def first(_app: web.Application) -> AsyncIterator[None]:
        events.append(f"{name} opened")
        yield
        events.append(f"{name} closed")

    async def second(_app: web.Application) -> AsyncIterator[None]:
        if isinstance(start_fails, Path):
            start_fails.mkdir()
        elif start_fails is not None:
            raise start_fails
        yield

    app.cleanup_ctx.extend([first, second])
    return app


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


async def test_a_directory_error_at_start_names_the_path_and_closes_what_started(
    tmp_path: Path,
) -> None:
    (tmp_path / "blobs").write_bytes(b"")
    events: list[str] = []
    first, second = free_port(), free_port()
    apps = [
        (app_with(events, "one", None), ("127.0.0.1", first)),
        (app_with(events, "two", tmp_path / "blobs"), ("127.0.0.1", second)),
    ]
    with pytest.raises(ConfigError) as caught:
        await run_until_signal(apps, grace=0)
    assert str(caught.value) == f"cannot start: {tmp_path / 'blobs'}: File exists"
    assert "listen" not in str(caught.value)
    assert events == ["one opened", "two opened", "two closed", "one closed"]
    assert port_is_free(first) and port_is_free(second)


async def test_a_config_error_of_start_up_is_passed_on_after_closing_what_opened() -> None:
    events: list[str] = []
    locked = ConfigError("/var/cache/x is locked by pid 42")
    apps = [(app_with(events, "one", locked), ("127.0.0.1", free_port()))]
    with pytest.raises(ConfigError) as caught:
        await run_until_signal(apps, grace=0)
    assert caught.value is locked
    assert events == ["one opened", "one closed"]


async def test_only_a_bind_failure_is_a_listen_error(caplog: pytest.LogCaptureFixture) -> None:
    events: list[str] = []
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        apps = [(app_with(events, "one", None), ("127.0.0.1", port))]
        assert await run_until_signal(apps, grace=0) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in caplog.text
    assert events == ["one opened", "one closed"]
