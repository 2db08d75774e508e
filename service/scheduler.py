"""The scheduler, in the API process: starts queued jobs and reconciles jobs whose driver died.

Every `scheduler_seconds` (and at once after a submit or cancel) it
- reconciles: a running job whose driver is gone (our child exited, its pid vanished on this host, or its heartbeat
  is older than `stale_seconds` by the database's clock) is queued again, so a new driver resumes it (finished trials
  are kept, trials left RUNNING are re-run in place); after `max_driver_starts` starts it is failed instead, with a
  reason, and its RUNNING trials are closed. A `cancelling` job whose driver is gone is closed as cancelled. A silent
  driver that is in fact alive (paused, say) is killed when it runs on this host (a paused process may hold the
  database's lock, and it holds the machine's resources); wherever it runs, it cannot interfere: the new driver's start
  took a new generation, and the old one's next write is refused, so it exits (see worker.py).
- starts queued jobs while fewer than `max_concurrent_jobs` run, owners taking turns (the owner whose most recent start
  is oldest goes first; see Store.claim_next): one driver process per job, `python -P -m service.worker JOB_ID
  GENERATION`, in its own session (so it survives the API process) and in an empty working directory of its own.
- removes the scratch of ended jobs (Tune's directory with the trials' checkpoints, the drivers' working directories)
  once `keep_scratch_seconds` have passed (a driver removes its own at once when that is 0).
- keeps the service's Ray head (service/ray_head.py) when RAY_ADDRESS names no cluster: one process owns it, starts
  it, restarts it when it dies, and stops it when the service stops; every driver attaches to it (its address and
  token are in the driver's environment), and no job is started while there is no live head.
- keeps one standby driver (`python -P -m service.worker --standby`) started and waiting, its modules loaded: a
  claimed job is handed to it (one line on its standard input) instead of waiting for a new driver's start-up, and a
  new standby is started a few seconds later.

All decisions are conditional UPDATEs in the database, and a claim checks the cap under a lock in the same
transaction, so several API processes (`koala serve --workers N`, replicas) can run a scheduler each.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState

from service.driver_host import (
    STANDBY_FLAG,
    driver_dir,
    driver_pythonpath,
    is_driver,
    remove_scratch,
    remove_stale_standby_dirs,
    standby_dir,
)
from service.ray_head import RayHead
from service.recorder import close_running, optimizer_names
from service.settings import Settings
from service.store import ACTIVE_STATES, JobRow, Store
from service.workload_checker import CheckerKeeper

log = logging.getLogger(__name__)
SWEEP_SECONDS = 5.0  # how often ended jobs' scratch is looked for
STANDBY_DELAY_SECONDS = 5.0  # after a handover, before the next standby starts (its start-up competes for the CPUs)
STANDBY_RETRY_SECONDS = 30.0  # after a standby exited on its own
# A new driver spends seconds loading its modules (torch, Ray, Optuna) before its first heartbeat, more on a busy
# machine: it counts as silent only this long after its start plus `stale_seconds`.
STARTUP_GRACE_SECONDS = 60.0


@dataclass
class _Child:
    process: subprocess.Popen[bytes]
    generation: int


@dataclass
class _Standby:
    process: subprocess.Popen[bytes]
    directory: Path


class Scheduler:
    def __init__(self, store: Store, storage: optuna.storages.BaseStorage, settings: Settings) -> None:
        self.store = store
        self.storage = storage
        self.settings = settings
        self.host = socket.gethostname()
        self.children: dict[str, _Child] = {}
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._tick_lock = threading.Lock()
        self._swept_at = 0.0
        # Set by start(): a scheduler driven tick by tick (tests) keeps no Ray head and no standby driver.
        self.head: RayHead | None = None
        self.standby: _Standby | None = None
        self._use_standby = False
        self._standby_after = 0.0
        self.checker: CheckerKeeper | None = None

    def start(self) -> None:
        if self.settings.ray_head and not os.environ.get("RAY_ADDRESS"):
            self.head = RayHead(self.settings.data_dir, self._driver_env(), self.settings.ray_num_cpus)
        self._use_standby = self.settings.standby_driver
        if self.settings.upload_checker:
            self.checker = CheckerKeeper(self.settings.data_dir / "logs" / "workload-checker.log")
        remove_stale_standby_dirs(standby_dir(self.settings).parent)
        self._keep_standby()  # it loads its modules while the head starts
        self._thread = threading.Thread(target=self._loop, name="koala-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop scheduling, and the Ray head if this process owns it. Drivers on a cluster (RAY_ADDRESS) or on Ray
        instances of their own are left alone: they finish their jobs without the API. Drivers on the service's head
        hand their jobs back when it stops, and the next start of the service resumes them."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._tick_lock:  # not in the middle of starting the head
            self._drop_standby()
            if self.checker is not None:
                self.checker.stop()
            with contextlib.suppress(OSError):
                standby_dir(self.settings).rmdir()  # if empty
            if self.head is not None:
                self.head.stop()

    def wake(self) -> None:
        self._wake.set()

    def signal_cancel(self, job_id: str) -> None:
        """Tell our own driver of a cancelled job at once (others notice `cancelling` at their next heartbeat)."""
        child = self.children.get(job_id)
        if child is not None and child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)

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
            if self.head is not None and not self._stopping.is_set():
                self.head.keep()  # adopt, start or restart it, if no other process keeps it
            self._keep_standby()
            self._keep_checker()
            self._reap()
            self.reconcile()
            self._start_queued()
            if time.monotonic() - self._swept_at >= SWEEP_SECONDS:
                self._swept_at = time.monotonic()
                self.sweep_scratch()

    # ---- reconciling -----------------------------------------------------------------------------------------------

    def reconcile(self) -> None:
        silent = self.store.silent_jobs(self.settings.stale_seconds)  # judged by the database's clock
        for job in self.store.jobs_in(ACTIVE_STATES):
            if not self._driver_alive(job, job.id in silent):
                self._recover(job, silent=job.id in silent)

    def _driver_alive(self, job: JobRow, silent: bool) -> bool:
        """Whether the job's current driver is alive: not if it exited or its pid vanished (where we can tell), nor if
        it has been silent too long, even when its process exists (paused, hung: it is replaced, and fenced off)."""
        child = self.children.get(job.id)
        if child is not None and child.generation == job.generation and child.process.poll() is not None:
            return False
        if job.driver_host == self.host and job.driver_pid is not None and not is_driver(job.driver_pid, job.id):
            return False
        return not silent

    def _recover(self, job: JobRow, *, silent: bool) -> None:
        """The job's driver is gone: resume the job, or end it. Each step is conditional on the generation seen, so
        a scheduler with a stale view never undoes a newer driver's start."""
        child = self.children.pop(job.id, None)
        if silent:
            self._kill_silent_driver(job, child)
        optimizers = optimizer_names(job.spec) or None
        if job.state == "cancelling":
            if self.store.finish(job.id, "cancelled", generation=job.generation):
                close_running(self.storage, job.id, "cancelled", TrialState.PRUNED, optimizers)
                self._ended(job.id)
                log.warning("job %s: driver gone while cancelling; closed as cancelled", job.id)
        elif job.attempts >= self.settings.max_driver_starts:
            reason = f"its driver died {job.attempts} times; giving up"
            if self.store.finish(job.id, "failed", reason, generation=job.generation):
                closed = close_running(self.storage, job.id, f"job failed: {reason}", TrialState.FAIL, optimizers)
                self._ended(job.id)
                log.error("job %s failed: %s (%d trials closed)", job.id, reason, closed)
        else:
            if silent:
                reason = f"its driver stopped answering (no heartbeat for {self.settings.stale_seconds:g} s); resuming"
            else:
                reason = "its driver died; resuming"
            stale = self.settings.stale_seconds if silent else None
            if self.store.requeue(job.id, reason, generation=job.generation, silent_for=stale):
                log.warning("job %s: %s", job.id, reason)

    def _kill_silent_driver(self, job: JobRow, child: _Child | None) -> None:
        """Kill the silent driver of `job` (with its process group: the local Ray it started) if it runs here."""
        if child is not None and child.generation == job.generation and child.process.poll() is None:
            pid = child.process.pid
        elif job.driver_host == self.host and job.driver_pid is not None and is_driver(job.driver_pid, job.id):
            pid = job.driver_pid
        else:
            return  # elsewhere (or gone): fencing keeps it from writing if it ever resumes
        try:
            if os.getpgid(pid) == pid:  # it leads its own process group, as we start it
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return
        log.warning("job %s: killed its silent driver (pid %d)", job.id, pid)

    def _reap(self) -> None:
        for job_id, child in list(self.children.items()):
            if child.process.poll() is not None:
                del self.children[job_id]
                job = self.store.get_job(job_id)
                if job is not None and job.state in ACTIVE_STATES and job.generation == child.generation:
                    self._recover(job, silent=False)

    # ---- starting --------------------------------------------------------------------------------------------------

    def _start_queued(self) -> None:
        if self.head is not None and self.head.current() is None:
            return  # the service's Ray head is starting or restarting: jobs wait in the queue
        # The jobs one API token runs at once are capped too (ownerless jobs only by max_concurrent_jobs).
        per_owner = self.settings.max_running_jobs_per_owner
        while not self._stopping.is_set():
            claimed = self.store.claim_next(self.host, self.settings.max_concurrent_jobs, per_owner)
            if claimed is None:
                return
            job_id, generation = claimed
            try:
                self._spawn(job_id, generation)
            except OSError as error:
                log.exception("job %s: could not start its driver", job_id)
                self.store.finish(job_id, "failed", f"its driver could not be started: {error}", generation=generation)

    def _driver_env(self) -> dict[str, str]:
        """The environment of a driver (and of the service's Ray head, which its trials' workers inherit)."""
        env = {**os.environ, **self.settings.environment()}
        pythonpath = driver_pythonpath(env.get("PYTHONPATH"))
        if pythonpath:
            env["PYTHONPATH"] = pythonpath
        else:
            env.pop("PYTHONPATH", None)
        if self.head is not None:
            env.update(self.head.auth_env())
        return env

    def _spawn(self, job_id: str, generation: int) -> None:
        logs = self.settings.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        # An empty working directory of its own, not on sys.path (-P): a file where the server was started (an
        # `optuna.py`, say) cannot shadow a module the driver imports.
        workdir = driver_dir(self.settings, job_id) / f"g{generation}"
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
        head = self.head.current() if self.head is not None else None
        attach = head.driver_env() if head is not None else {}  # the service's Ray head: address, token
        process = self._hand_to_standby(job_id, generation, workdir, attach)
        how = "handed to the standby driver"
        if process is None:
            how = "driver started"
            with open(logs / f"{job_id}.log", "ab") as output:
                process = subprocess.Popen(
                    [sys.executable, "-P", "-m", "service.worker", job_id, str(generation)],
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    env={**self._driver_env(), **attach},
                    cwd=workdir,
                    start_new_session=True,  # its own process group: survives the API, and the API's Ctrl-C
                )
        self.children[job_id] = _Child(process, generation)
        self.store.set_driver(
            job_id, process.pid, self.host, generation=generation, grace_seconds=STARTUP_GRACE_SECONDS
        )
        log.info("job %s: %s (pid %d, generation %d)", job_id, how, process.pid, generation)

    def _keep_checker(self) -> None:
        """Have the cluster's warm checker of uploaded workloads started (service/workload_checker.py)."""
        if self.checker is None or self._stopping.is_set():
            return
        head = self.head.current() if self.head is not None else None
        address = head.address if head is not None else os.environ.get("RAY_ADDRESS")
        attach = head.driver_env() if head is not None else {}
        self.checker.keep(address, {**self._driver_env(), **attach})

    # ---- the standby driver ----------------------------------------------------------------------------------------

    def _keep_standby(self) -> None:
        """Have one standby driver waiting (a while after the last one took a job, and not while stopping)."""
        if not self._use_standby or self._stopping.is_set():
            return
        if self.standby is not None and self.standby.process.poll() is not None:
            log.warning("the standby driver exited (%s); starting another later", self.standby.process.returncode)
            shutil.rmtree(self.standby.directory, ignore_errors=True)
            self.standby = None
            self._standby_after = time.monotonic() + STANDBY_RETRY_SECONDS
        if self.standby is None and time.monotonic() >= self._standby_after:
            self.standby = self._spawn_standby()

    def _spawn_standby(self) -> _Standby | None:
        directory = standby_dir(self.settings) / uuid.uuid4().hex[:12]
        logs = self.settings.data_dir / "logs"
        try:
            directory.mkdir(parents=True)
            logs.mkdir(parents=True, exist_ok=True)
            with open(logs / "standby.log", "ab") as output:
                process = subprocess.Popen(
                    [sys.executable, "-P", "-m", "service.worker", STANDBY_FLAG],
                    stdin=subprocess.PIPE,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    env=self._driver_env(),  # the head's address comes with its job (the head may restart)
                    cwd=directory,
                    start_new_session=True,
                )
        except OSError:
            log.exception("could not start a standby driver")
            self._standby_after = time.monotonic() + STANDBY_RETRY_SECONDS
            return None
        return _Standby(process, directory)

    def _hand_to_standby(
        self, job_id: str, generation: int, workdir: Path, env: dict[str, str]
    ) -> subprocess.Popen[bytes] | None:
        """Give the job to the standby driver; returns its process, or None when there is none to take it."""
        standby, self.standby = self.standby, None
        if standby is None:
            return None
        self._standby_after = time.monotonic() + STANDBY_DELAY_SECONDS
        order = {"job_id": job_id, "generation": generation, "workdir": str(workdir), "env": env}
        try:
            if standby.process.poll() is not None or standby.process.stdin is None:
                raise BrokenPipeError("the standby driver has exited")
            standby.process.stdin.write(json.dumps(order).encode() + b"\n")
            standby.process.stdin.close()
        except OSError:
            log.warning("the standby driver could not take job %s; starting a driver for it", job_id)
            with contextlib.suppress(OSError):
                standby.process.kill()
            shutil.rmtree(standby.directory, ignore_errors=True)
            return None
        return standby.process

    def _drop_standby(self) -> None:
        standby, self.standby = self.standby, None
        if standby is not None:
            with contextlib.suppress(OSError):
                standby.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                standby.process.wait(timeout=5)
            shutil.rmtree(standby.directory, ignore_errors=True)

    # ---- disk ------------------------------------------------------------------------------------------------------

    def sweep_scratch(self) -> None:
        """Remove the scratch of jobs that ended at least `keep_scratch_seconds` ago."""
        found = set()
        for base in (self.settings.data_dir / "tune", self.settings.data_dir / "drivers"):
            if base.is_dir():
                found |= {path.name for path in base.iterdir() if path.is_dir()}
        for job_id in self.store.ended_before(sorted(found), self.settings.keep_scratch_seconds):
            remove_scratch(self.settings, job_id)
            log.info("job %s: scratch removed", job_id)

    def _ended(self, job_id: str) -> None:
        if self.settings.keep_scratch_seconds <= 0:
            remove_scratch(self.settings, job_id)
