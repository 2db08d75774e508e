"""Shared fixtures: a real `koala serve` process on a free loopback port, with its own data directory."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LiveServer:
    """A `koala serve` process. Its job drivers run in their own sessions and outlive it, as in production."""

    data_dir: Path
    env: dict[str, str]
    host: str = "127.0.0.1"
    port: int = 0
    cwd: Path | None = None  # the server's working directory (default: the test's)
    process: subprocess.Popen[bytes] | None = None
    logs: list[Path] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def database_url(self) -> str:
        return self.env["KOALA_DATABASE_URL"]

    def start(self, timeout: float = 90) -> LiveServer:
        self.port = free_port()
        log = self.data_dir / f"server-{len(self.logs)}.log"
        self.logs.append(log)
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "koala_client.cli", "serve", "--host", self.host, "--port", str(self.port)],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.cwd,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server did not answer within {timeout} s:\n{log.read_text()}")

    def kill(self) -> None:
        """kill -9 the API process (not its job drivers)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def log_text(self) -> str:
        return "\n".join(path.read_text(errors="replace") for path in self.logs)


def kill_drivers(database_url: str) -> None:
    """Kill every job driver (with the local Ray it started) recorded in the database."""
    import sqlalchemy as sa

    from service.store import Store, jobs

    store = Store(database_url)
    try:
        with store.engine.connect() as db:
            pids = [pid for (pid,) in db.execute(sa.select(jobs.c.driver_pid).where(jobs.c.driver_pid.is_not(None)))]
    except sa.exc.OperationalError:
        pids = []
    finally:
        store.close()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)  # a driver leads its own process group


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
        environment = {k: v for k, v in os.environ.items() if not k.startswith(("KOALA_", "RAY_ADDRESS"))}
        environment["KOALA_DATA_DIR"] = str(data_dir)
        environment["KOALA_DATABASE_URL"] = database_url or f"sqlite:///{data_dir / 'koala.db'}"
        environment["KOALA_SCHEDULER_SECONDS"] = "0.5"
        environment.update({f"KOALA_{key.upper()}": str(value) for key, value in settings.items()})
        environment.update(env or {})
        server = LiveServer(data_dir, environment, cwd=cwd)
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
    from tests.topology import PostgresUnavailableError, temporary_database

    with contextlib.ExitStack() as stack:
        try:
            url = stack.enter_context(temporary_database())
        except PostgresUnavailableError as error:
            pytest.skip(str(error))
        yield url
