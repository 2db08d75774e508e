"""The service's own Ray: one local Ray head that every job's driver attaches to.

Without `RAY_ADDRESS`, `koala serve` runs one Ray head for its lifetime (as `ray start --head --block` would, on this
machine, with the machine's resources or `KOALA_RAY_NUM_CPUS`), so jobs pay no Ray start-up and concurrent jobs share
the machine through Ray's scheduler: each trial holds its JobSpec `resources`, whichever job it belongs to.

- One owner. Every API process with a scheduler tries to take an exclusive lock (`data_dir/ray/head.lock`); the one
  that holds it starts the head, records it in `data_dir/ray/head.json` (address, process, token; mode 0600), watches
  it and stops it when it stops. The others read the record. A lock dies with its process, so when the owner dies
  another process (or the restarted server) takes over and adopts the head if it is still alive: a server killed
  with `kill -9` leaves its jobs running on it.
- A head that dies (its `ray start` process exits, or its GCS or raylet stops answering) is restarted. The drivers
  attached to the dead one notice (`AttachedHead.alive`, checked before each of their writes and at each heartbeat)
  and hand their jobs back to the queue without touching them; the scheduler starts no job while there is no live
  head, and resumes them on the new one.
- Token authentication: the head requires a random token of the service's own (`data_dir/ray/token`, mode 0600,
  kept across restarts of the head because Ray reads it once per process) that drivers receive in their environment,
  so other users of the machine cannot submit work to it. Ray itself listens on the machine's address, not only on
  loopback (it does not offer that); the token is what keeps others out.
- Its processes run in a short private directory under the system's temp root (Unix socket paths are limited to about
  107 bytes), which marks them: stopping the head kills its process group and every process whose command line names
  that directory, and nothing else.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from service.driver_host import process_exists

log = logging.getLogger(__name__)

STATE_FILE = "head.json"
TOKEN_FILE = "token"
LOCK_FILE = "head.lock"
LOG_FILE = "head.log"
START_TIMEOUT_SECONDS = 180.0
UNANSWERED_CHECKS = 3  # a live `ray start` whose GCS or raylet fails this many checks in a row is taken for dead
# A driver attached to the service's head finds it through these (see AttachedHead).
PID_ENV = "KOALA_RAY_HEAD_PID"
DIR_ENV = "KOALA_RAY_HEAD_DIR"


class RayHeadError(RuntimeError):
    """The head could not be started."""


def head_directory(data_dir: Path) -> Path:
    return data_dir / "ray"


@dataclass(frozen=True)
class HeadInfo:
    """A running head: its GCS address, the `ray start --block` process (leader of its own process group), the
    directory that marks its processes, its raylet's port, and its token."""

    address: str
    pid: int
    temp_dir: str
    node_manager_port: int
    token: str

    def driver_env(self) -> dict[str, str]:
        """The environment a driver needs to attach to this head (and to notice when it is gone)."""
        return {
            "RAY_ADDRESS": self.address,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            PID_ENV: str(self.pid),
            DIR_ENV: self.temp_dir,
        }

    def process_alive(self) -> bool:
        return _is_head_process(self.pid, self.temp_dir)

    def answers(self) -> bool:
        """Whether its GCS and its raylet accept connections."""
        port = int(self.address.rpartition(":")[2])
        return _listening(port) and _listening(self.node_manager_port)


@dataclass(frozen=True)
class AttachedHead:
    """The head a driver was started on, as its environment names it; `alive()` is cheap (no network), for a check
    before every write."""

    pid: int
    temp_dir: str

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> AttachedHead | None:
        env = os.environ if env is None else env
        pid, temp_dir = env.get(PID_ENV, ""), env.get(DIR_ENV, "")
        return cls(int(pid), temp_dir) if pid.isdigit() and temp_dir else None

    def alive(self) -> bool:
        return _is_head_process(self.pid, self.temp_dir)


def read_state(directory: Path) -> HeadInfo | None:
    """The head recorded under `directory`, alive or not; None if there is no (readable) record."""
    try:
        data = json.loads((directory / STATE_FILE).read_text())
        return HeadInfo(**data)
    except (OSError, ValueError, TypeError):
        return None


def _token(directory: Path) -> str:
    """The service's Ray token, created on first use."""
    path = directory / TOKEN_FILE
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        token = ""
    if len(token) < 32:
        directory.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(32)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as out:
            out.write(token)
    return token


def _write_state(directory: Path, info: HeadInfo) -> None:
    temporary = directory / f".{STATE_FILE}.{os.getpid()}"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds the head's token
    with os.fdopen(descriptor, "w") as out:
        json.dump(asdict(info), out)
    os.replace(temporary, directory / STATE_FILE)


def _cmdline(pid: int) -> bytes | None:
    """The command line of `pid`; empty for a zombie; None when there is no such process or no /proc."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return None
    except OSError:
        return None


def _is_head_process(pid: int, temp_dir: str) -> bool:
    """Whether `pid` is the live `ray start` of the head marked by `temp_dir` (a reused pid is not)."""
    cmdline = _cmdline(pid)
    if cmdline is not None:
        return temp_dir.encode() in cmdline
    # No /proc (macOS): "a process with that pid exists".
    return not Path("/proc/self").exists() and process_exists(pid)


def _listening(port: int, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _marked_processes(temp_dir: str) -> set[int]:
    marker = temp_dir.encode()
    found = set()
    with contextlib.suppress(OSError):
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                cmdline = _cmdline(int(entry.name))
                if cmdline and marker in cmdline:
                    found.add(int(entry.name))
    return found


def terminate(info: HeadInfo, grace_seconds: float = 10.0) -> None:
    """Stop a head and everything it runs: SIGTERM to its process group and its marked processes, SIGKILL to what is
    left after `grace_seconds`; then remove its directory. Its trial workers exit with their raylet."""
    for sig, wait in ((signal.SIGTERM, grace_seconds), (signal.SIGKILL, 5.0)):
        if _is_head_process(info.pid, info.temp_dir):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(info.pid, sig)
        for pid in _marked_processes(info.temp_dir):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _is_head_process(info.pid, info.temp_dir) and not _marked_processes(info.temp_dir):
                break
            time.sleep(0.1)
        else:
            continue
        break
    shutil.rmtree(info.temp_dir, ignore_errors=True)


def stop_recorded(data_dir: Path) -> None:
    """Stop the head recorded under `data_dir`, if any (whoever started it); for clean-ups after a killed server."""
    directory = head_directory(data_dir)
    info = read_state(directory)
    if info is not None:
        terminate(info, grace_seconds=2.0)
        with contextlib.suppress(FileNotFoundError):
            (directory / STATE_FILE).unlink()


class RayHead:
    """This process's part in keeping the service's head: `keep()` (called periodically by the scheduler) takes the
    lock when it is free and then adopts, starts or restarts the head; `current()` is the live head for any process;
    `stop()` stops it if this process owns it."""

    def __init__(self, data_dir: Path, env: Mapping[str, str], num_cpus: float | None = None) -> None:
        self.directory = head_directory(data_dir)
        self.env = dict(env)
        self.num_cpus = num_cpus
        self.token = _token(self.directory)
        self.info: HeadInfo | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._lock: int | None = None
        self._unanswered = 0

    def auth_env(self) -> dict[str, str]:
        """What any process needs to talk to the head (a standby driver gets it before it imports Ray)."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    @property
    def owner(self) -> bool:
        return self._lock is not None

    def _take_lock(self) -> bool:
        self.directory.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(descriptor)
            return False
        self._lock = descriptor
        return True

    def current(self) -> HeadInfo | None:
        """The live head that jobs attach to now (ours, or the one the owner recorded); None while there is none."""
        info = self.info if self.owner else read_state(self.directory)
        if info is None:
            return None
        if self.process is not None:
            self.process.poll()  # reap our own child, so that a dead one is not a zombie with its pid
        return info if info.process_alive() else None

    def keep(self) -> HeadInfo | None:
        """If no other process owns the head, own it: adopt the recorded head if it is alive, else start one; restart
        it when it has died. Returns the live head, or None (another process keeps it, or it failed to start)."""
        if not self.owner and not self._take_lock():
            return None
        if self.info is None:
            recorded = read_state(self.directory)
            ours = recorded is not None and recorded.token == self.token  # (not if the token file was replaced)
            if recorded is not None and ours and recorded.process_alive() and recorded.answers():
                log.info("adopted the Ray head at %s (pid %d)", recorded.address, recorded.pid)
                self.info = recorded
                return self.info
            if recorded is not None:
                terminate(recorded, grace_seconds=2.0)
            return self._start()
        if self._healthy(self.info):
            return self.info
        log.error("the Ray head at %s (pid %d) died; restarting it", self.info.address, self.info.pid)
        terminate(self.info, grace_seconds=2.0)
        self.info = None
        self.restarts += 1
        return self._start()

    def _healthy(self, info: HeadInfo) -> bool:
        if self.process is not None:
            self.process.poll()
        if not info.process_alive():
            return False
        if info.answers():
            self._unanswered = 0
            return True
        self._unanswered += 1
        return self._unanswered < UNANSWERED_CHECKS

    def _start(self) -> HeadInfo | None:
        try:
            self.info = self._launch()
        except (RayHeadError, OSError):
            log.exception("could not start the Ray head (jobs wait until it runs; retrying)")
            self.info = None
            return None
        self._unanswered = 0
        _write_state(self.directory, self.info)
        log.info("Ray head started at %s (pid %d)", self.info.address, self.info.pid)
        return self.info

    def _launch(self) -> HeadInfo:
        token = self.token
        # Short, private and only ours: Unix socket paths under it must stay within about 107 bytes.
        temp_dir = tempfile.mkdtemp(prefix="koala-ray-", dir="/tmp" if Path("/tmp").is_dir() else None)
        gcs, node_manager = _free_port(), _free_port()
        command = [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs}",
            f"--temp-dir={temp_dir}",
            "--include-dashboard=false",
            f"--dashboard-port={_free_port()}",
            f"--node-manager-port={node_manager}",
            f"--object-manager-port={_free_port()}",
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}",
            f"--metrics-export-port={_free_port()}",
            "--disable-usage-stats",
        ]
        if self.num_cpus is not None:
            command.append(f"--num-cpus={self.num_cpus:g}")
        env = {k: v for k, v in self.env.items() if k != "RAY_ADDRESS"}
        env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0"})
        logfile = self.directory / LOG_FILE
        with contextlib.suppress(OSError):
            logfile.replace(self.directory / f"{LOG_FILE}.previous")
        with open(logfile, "wb") as out:
            process = subprocess.Popen(
                command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=temp_dir,  # an empty directory: nothing where the server was started is on its workers' path
                start_new_session=True,  # its own process group: stopped as one, and deaf to the server's Ctrl-C
            )
        self.process = process
        info = HeadInfo(f"127.0.0.1:{gcs}", process.pid, temp_dir, node_manager, token)
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if process.poll() is not None:
                shutil.rmtree(temp_dir, ignore_errors=True)
                tail = logfile.read_text(errors="replace")[-3000:]
                raise RayHeadError(f"`ray start` exited with {process.returncode}:\n{tail}")
            if "Ray runtime started" in logfile.read_text(errors="replace") and info.answers():
                return info
            time.sleep(0.2)
        terminate(info, grace_seconds=2.0)
        raise RayHeadError(f"the Ray head did not start within {START_TIMEOUT_SECONDS:g} s (log: {logfile})")

    def stop(self) -> None:
        """Stop the head if this process owns it, and give up the ownership."""
        if self.owner and self.info is not None:
            log.info("stopping the Ray head at %s", self.info.address)
            terminate(self.info)
            with contextlib.suppress(FileNotFoundError):
                (self.directory / STATE_FILE).unlink()
            self.info = None
        if self.process is not None:
            self.process.poll()
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None
