"""The scheduler, in the API process: starts queued jobs and reconciles jobs whose driver died.

Every `scheduler_seconds` (and at once after a submit or cancel) it
- reconciles: a running job whose driver is gone (our child exited, its pid vanished on this host, or its heartbeat
  is older than `stale_seconds`) is queued again, so a new driver resumes it (finished trials are kept, trials left
  RUNNING are re-run in place); after `max_driver_starts` starts it is failed instead, with a reason, and its
  RUNNING trials are closed. A `cancelling` job whose driver is gone is closed as cancelled.
- starts queued jobs, oldest first, while fewer than `max_concurrent_jobs` run: one driver process per job,
  `python -m service.worker JOB_ID`, in its own session so it survives the API process.

All decisions are conditional UPDATEs in the database, so several API processes can run a scheduler each.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

import optuna
from optuna.trial import TrialState

from service.recorder import close_running
from service.settings import Settings
from service.store import ACTIVE_STATES, JobRow, Store, now

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, store: Store, storage: optuna.storages.BaseStorage, settings: Settings) -> None:
        self.store = store
        self.storage = storage
        self.settings = settings
        self.host = socket.gethostname()
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._tick_lock = threading.Lock()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="koala-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop scheduling. Running drivers are left alone: they finish their jobs without the API."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def wake(self) -> None:
        self._wake.set()

    def signal_cancel(self, job_id: str) -> None:
        """Tell our own driver of a cancelled job at once (others notice `cancelling` at their next heartbeat)."""
        child = self.children.get(job_id)
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self.tick()
            except Exception:  # the database may be briefly unavailable; try again next period
                log.exception("scheduler tick failed")
            self._wake.wait(self.settings.scheduler_seconds)
            self._wake.clear()

    def tick(self) -> None:
        with self._tick_lock:
            self._reap()
            self.reconcile()
            self._start_queued()

    # ---- reconciling -----------------------------------------------------------------------------------------------

    def reconcile(self) -> None:
        for job in self.store.jobs_in(ACTIVE_STATES):
            if not self._driver_alive(job):
                self._recover(job)

    def _driver_alive(self, job: JobRow) -> bool:
        child = self.children.get(job.id)
        if child is not None:
            return child.poll() is None
        if job.driver_host == self.host and job.driver_pid is not None and not _is_driver(job.driver_pid, job.id):
            return False
        beat = job.heartbeat_at
        return beat is not None and now() - beat < timedelta(seconds=self.settings.stale_seconds)

    def _recover(self, job: JobRow) -> None:
        self.children.pop(job.id, None)
        if job.state == "cancelling":
            close_running(self.storage, job.id, "cancelled", TrialState.PRUNED)
            self.store.finish(job.id, "cancelled")
            log.warning("job %s: driver gone while cancelling; closed as cancelled", job.id)
        elif job.attempts >= self.settings.max_driver_starts:
            reason = f"its driver died {job.attempts} times; giving up"
            closed = close_running(self.storage, job.id, f"job failed: {reason}", TrialState.FAIL)
            self.store.finish(job.id, "failed", reason)
            log.error("job %s failed: %s (%d trials closed)", job.id, reason, closed)
        elif self.store.requeue(job.id, "its driver died; resuming"):
            log.warning("job %s: driver died; queued to resume", job.id)

    def _reap(self) -> None:
        for job_id, child in list(self.children.items()):
            if child.poll() is not None:
                del self.children[job_id]
                job = self.store.get_job(job_id)
                if job is not None and job.state in ACTIVE_STATES:
                    self._recover(job)

    # ---- starting --------------------------------------------------------------------------------------------------

    def _start_queued(self) -> None:
        active = len(self.store.jobs_in(ACTIVE_STATES))
        for job in self.store.jobs_in(["queued"]):
            if active >= self.settings.max_concurrent_jobs:
                return
            if self.store.claim(job.id, self.host):
                self._spawn(job.id)
                active += 1

    def _spawn(self, job_id: str) -> None:
        logs = self.settings.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.settings.environment()}
        with open(logs / f"{job_id}.log", "ab") as output:
            child = subprocess.Popen(
                [sys.executable, "-m", "service.worker", job_id],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=Path.cwd(),
                start_new_session=True,  # its own process group: survives the API, and the API's Ctrl-C
            )
        self.children[job_id] = child
        self.store.set_driver(job_id, child.pid, self.host)
        log.info("job %s: driver started (pid %d)", job_id, child.pid)


def _is_driver(pid: int, job_id: str) -> bool:
    """Whether process `pid` on this host is the driver of `job_id` (a reused pid is not)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (macOS): fall back to "a process with that pid exists"
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return b"service.worker" in cmdline and job_id.encode() in cmdline
