"""Shared fixtures: real `koala serve` processes on free loopback ports (service.testing), each with its own data
directory, and a fresh PostgreSQL database. Shared helper functions live in tests/helpers.py."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from service.testing import LiveServer, PostgresUnavailableError, kill_drivers, server_environment, temporary_database


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Any]:
    """Start servers on a fresh data directory: `server_factory(database_url=None, env=None, cwd=None,
    **KOALA_settings)`; all stopped afterwards. `env` adds variables to the server's environment (which inherits its
    drivers), e.g. RAY_ADDRESS of a cluster; otherwise RAY_ADDRESS is removed, so the server runs its own Ray head.
    `cwd`: the server's working directory (default: the test's)."""
    started: list[LiveServer] = []

    def start(
        database_url: str | None = None, env: Mapping[str, str] | None = None, cwd: Path | None = None, **settings: Any
    ) -> LiveServer:
        data_dir = tmp_path / f"koala-{len(started)}"
        data_dir.mkdir()
        server = LiveServer(data_dir, server_environment(data_dir, database_url, env, **settings), cwd=cwd)
        started.append(server)
        return server.start()

    yield start
    from service.ray_head import stop_recorded

    for server in started:
        server.stop()
        kill_drivers(server.database_url)
        stop_recorded(server.data_dir)  # the server's Ray head, when a killed server left it running


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test (dropped afterwards); the test is skipped when the server at
    KOALA_TEST_POSTGRES_URL (default: postgres@127.0.0.1:5432) cannot be reached."""
    with contextlib.ExitStack() as stack:
        try:
            url = stack.enter_context(temporary_database())
        except PostgresUnavailableError as error:
            pytest.skip(str(error))
        yield url
