"""Real processes on loopback, for tests and benchmarks: a `koala serve` on a free port with its own data directory
(`LiveServer`), a fresh PostgreSQL database (`temporary_database`), and a multi-node Ray cluster of one
`ray start --block` process per node (`LoopbackCluster`), all on 127.0.0.1. Shipped with the service the way
`ray.cluster_utils` and `fastapi.testclient` ship with theirs; nothing here imports pytest.

Every Ray node gets its own ports (so two raylets can share the host) and its own directory under one private temp
root, which is how its processes are found again: killing a node kills the `ray start` process group and every
process whose command line names that node's directory (Ray's workers run in process groups of their own). Nothing
outside the root is touched, so other Ray instances on the machine are left alone.

The cluster's token authentication is on, with a token of its own (RAY_AUTH_TOKEN), so it neither reads nor writes
the user's ~/.ray/auth_token. `cluster.env` is what a driver needs to join: RAY_ADDRESS and the token.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

RAY = str(Path(sys.executable).with_name("ray"))
POSTGRES_URL = os.environ.get("KOALA_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
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
        """Start the server on a free port and wait until /healthz answers; RuntimeError if it exits first."""
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
        raise TimeoutError(f"koala serve at {self.url} did not answer /healthz within {timeout} s:\n{log.read_text()}")

    def kill(self) -> None:
        """kill -9 the API process (not its job drivers)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        """SIGINT the API process, as an operator would; kill -9 after 15 s."""
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


def server_environment(
    data_dir: Path, database_url: str | None = None, env: Mapping[str, str] | None = None, **settings: Any
) -> dict[str, str]:
    """The environment of a `koala serve` on `data_dir`: this process's, less every KOALA_* variable and RAY_ADDRESS
    (so the server runs its own Ray head unless `env` names a cluster), with the data directory, the database (by
    default SQLite in the data directory), a 0.5 s scheduler tick, `settings` as KOALA_<NAME> and `env` on top."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("KOALA_", "RAY_ADDRESS"))}
    environment["KOALA_DATA_DIR"] = str(data_dir)
    environment["KOALA_DATABASE_URL"] = database_url or f"sqlite:///{data_dir / 'koala.db'}"
    environment["KOALA_SCHEDULER_SECONDS"] = "0.5"
    environment.update({f"KOALA_{key.upper()}": str(value) for key, value in settings.items()})
    environment.update(env or {})
    return environment


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


class PostgresUnavailableError(RuntimeError):
    pass


@contextlib.contextmanager
def temporary_database(server_url: str = POSTGRES_URL) -> Iterator[str]:
    """A new, empty database `koala_test_<random>` on the server of `server_url`; yields its SQLAlchemy URL and
    drops it afterwards (closing whatever connections are left). Raises PostgresUnavailableError when the server
    cannot be reached."""
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(server_url)
    admin = url.set(drivername="postgresql").render_as_string(hide_password=False)
    name = f"koala_test_{secrets.token_hex(6)}"
    try:
        connection = psycopg.connect(admin, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as error:
        raise PostgresUnavailableError(f"PostgreSQL at {url.render_as_string()} is unreachable: {error}") from None
    with connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class RayNode:
    """One `ray start --block` process of a LoopbackCluster; `node_id` is filled in once the cluster lists it."""

    name: str
    directory: Path
    process: subprocess.Popen[bytes]
    log: Path
    resources: dict[str, float]
    node_manager_port: int
    node_id: str = ""

    def alive(self) -> bool:
        return self.process.poll() is None


@dataclass
class LoopbackCluster:
    """Ray nodes on 127.0.0.1; call `stop()` (or use it as a context manager) to remove every process it started."""

    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="koala-ray-", dir="/tmp")))
    token: str = field(default_factory=lambda: secrets.token_hex(32))
    port: int = 0
    nodes: list[RayNode] = field(default_factory=list)

    # Unix socket paths (under each node's directory) are limited to about 107 bytes, so the root is a short
    # directory of its own under /tmp rather than a deep test directory.

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """Variables for a process that drives jobs on this cluster."""
        return {
            "RAY_ADDRESS": self.address,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "RAY_USAGE_STATS_ENABLED": "0",
        }

    def _base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "KOALA_"))}
        env.update(self.env)
        del env["RAY_ADDRESS"]
        return env

    def add_node(
        self, name: str, *, num_cpus: float = 1, num_gpus: float = 0, resources: dict[str, float] | None = None
    ) -> RayNode:
        """Start a node (the first one is the head) and wait until the cluster lists it."""
        head = not self.nodes
        directory = self.root / name
        directory.mkdir(parents=True)
        node_manager_port = free_port()
        command = [
            RAY,
            "start",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--temp-dir={directory}",
            f"--num-cpus={num_cpus:g}",
            f"--num-gpus={num_gpus:g}",
            f"--resources={json.dumps(resources or {})}",
            f"--node-manager-port={node_manager_port}",
            f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--object-store-memory={150 * 1024 * 1024}",
            "--disable-usage-stats",
        ]
        if head:
            self.port = free_port()
            command += [
                "--head",
                f"--port={self.port}",
                "--include-dashboard=false",
                f"--dashboard-port={free_port()}",
            ]
        else:
            command += [f"--address={self.address}"]
        log = self.root / f"{name}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(
                command,
                env=self._base_env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, killed as one
            )
        resources = {"CPU": num_cpus, "GPU": num_gpus, **(resources or {})}
        node = RayNode(name, directory, process, log, resources, node_manager_port)
        self.nodes.append(node)
        self.wait_for_nodes()
        return node

    def describe(self) -> list[dict[str, Any]]:
        """The cluster's live nodes as Ray reports them (NodeID, Resources, ...), asked from a short-lived driver."""
        script = (
            "import json, ray; ray.init(logging_level='ERROR', log_to_driver=False); "
            "print(json.dumps([n for n in ray.nodes() if n['Alive']]))"
        )
        env = {**self._base_env(), "RAY_ADDRESS": self.address}
        result = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"cannot list the nodes of {self.address}:\n{result.stderr[-4000:]}")
        return json.loads(result.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]

    def wait_for_nodes(self, timeout: float = 180) -> None:
        """Wait until every live node of ours is in the cluster; records their node ids."""
        deadline = time.monotonic() + timeout
        while True:
            for node in self.nodes:
                if not node.alive() and node.node_id == "":
                    raise RuntimeError(f"ray node {node.name} exited:\n{node.log.read_text(errors='replace')[-4000:]}")
            with contextlib.suppress(RuntimeError):
                listed = self.describe()
                by_port = {int(info["NodeManagerPort"]): info["NodeID"] for info in listed}
                for node in self.nodes:
                    node.node_id = node.node_id or by_port.get(node.node_manager_port, "")
                if all(node.node_id for node in self.nodes if node.alive()):
                    return
            if time.monotonic() > deadline:
                logs = "\n".join(n.log.read_text(errors="replace")[-2000:] for n in self.nodes)
                raise TimeoutError(f"the cluster did not list all of its nodes within {timeout} s:\n{logs}")
            time.sleep(1)

    def _pids_of(self, node: RayNode) -> set[int]:
        marker = str(node.directory).encode()
        pids = set()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                if marker in (entry / "cmdline").read_bytes():
                    pids.add(int(entry.name))
        return pids

    def kill(self, node: RayNode) -> None:
        """SIGKILL a node: its `ray start` process group and every process of its directory (a crashed machine)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(node.process.pid, signal.SIGKILL)
        for pid in self._pids_of(node):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        node.process.wait()

    def stop(self) -> None:
        """Kill every node (workers first, then the head) and remove the temp root; leaves no Ray process behind."""
        for node in reversed(self.nodes):
            self.kill(node)
        # Bounded: this runs on the way out of a `with` (raising here would hide the error that ended it); callers
        # that must know assert `leftover_pids() == set()` afterwards.
        deadline = time.monotonic() + 10
        while any(self._pids_of(node) for node in self.nodes) and time.monotonic() < deadline:
            for node in self.nodes:
                for pid in self._pids_of(node):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
        shutil.rmtree(self.root, ignore_errors=True)

    def leftover_pids(self) -> set[int]:
        return {pid for node in self.nodes for pid in self._pids_of(node)}

    def __enter__(self) -> LoopbackCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
