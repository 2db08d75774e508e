"""The driver of one job: `python -P -m service.worker JOB_ID GENERATION`.

The scheduler starts it in its own process group, in an empty working directory of its own and without that
directory on sys.path (`-P`), so it outlives the API process (a restarted API finds it by its heartbeat) and no file
where the server was started can shadow a module it imports. It runs the job through the engine `koala run` uses, is
the only writer to the job's Optuna studies, writes progress and events to our tables, stops gracefully when the job
is set to `cancelling` (or on SIGTERM), and ends the job as succeeded, cancelled or failed. Started again for a job
whose earlier driver died, it resumes: the engine skips finished trials and re-runs the ones left RUNNING.

Fencing: GENERATION is the number the scheduler's claim took for this start. Every write the driver makes is
conditional on it (our tables: a conditional UPDATE; the Optuna studies: a check right before each write), so once a
newer driver owns the job (this one was taken for dead while it was paused, say) the old one's writes are refused.
A driver refused once, or whose heartbeat finds another generation, exits at once, shutting down the Ray it started,
without touching the job or its trials. Its writes retry through a busy database (a locked SQLite file, a restarting
PostgreSQL) for `db_retry_seconds`; past that the driver stops with the reason in its log, and the scheduler resumes
the job once the database answers.

On the service's own Ray head (service/ray_head.py), the driver also checks before each write and at each heartbeat
that the head it attached to is still alive. Once it is gone the driver hands the job back to the queue (without
counting a driver start) and exits, touching no trial: the scheduler resumes the job on the restarted head, where the
trials left RUNNING are re-run in place.

Standby (`python -P -m service.worker --standby`): a driver started ahead of any job, which imports and loads what a
driver needs (torch, Ray Tune, the fused CPU kernels, the database connections) and then waits for one line on its
standard input, `{"job_id", "generation", "workdir", "env"}`, from the scheduler that claimed a job. It then moves to
the job's working directory and log and drives the job like a driver started for it, without paying the seconds of
start-up between a job's claim and its first trial. End of input (the scheduler went away) ends it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn, TypeVar

import optuna
import ray
import sqlalchemy as sa
from optuna.trial import TrialState

from service.driver_host import STANDBY_FLAG, STANDBY_READY, remove_scratch, scratch_dir
from service.engine import TrialEvent, run_job
from service.guarded_storage import GuardedStorage
from service.jobspec import JobSpec, SpecError
from service.ray_head import AttachedHead
from service.recorder import Recorder, close_running, optimizer_names, storage_for
from service.retry import DatabaseUnavailableError, retry
from service.settings import Settings
from service.store import FencedError, JobRow, Store
from service.upload_runtime import WorkloadCheckError, prepare_job

log = logging.getLogger("service.worker")
T = TypeVar("T")

EXIT_FENCED = 3  # another driver owns the job: this one stopped without touching it
EXIT_DATABASE = 4  # the database stayed unavailable longer than db_retry_seconds
EXIT_RAY_LOST = 5  # the service's Ray head this driver ran on is gone: the job went back to the queue


def abandon(reason: str) -> NoReturn:
    """Stop this driver at once, touching neither the job nor its trials: shut down Ray (a local Ray it started
    goes with it; on a cluster its trials' actors are released) and exit."""
    log.error("stopping at once, leaving the job to its current driver: %s", reason)
    if ray.is_initialized():
        # Tune may be running in another thread: shut Ray down from a helper thread, and do not wait forever.
        closer = threading.Thread(target=ray.shutdown, name="ray-shutdown", daemon=True)
        closer.start()
        closer.join(timeout=20)
    logging.shutdown()
    os._exit(EXIT_FENCED)


class Lease:
    """This driver's hold on its job: the job id and the generation its start took. Every write to our tables goes
    through here (retried through a busy database, fenced by the generation); `check` is the Recorder's fence."""

    def __init__(
        self, store: Store, job_id: str, generation: int, retry_seconds: float, head: AttachedHead | None = None
    ) -> None:
        self.store = store
        self.job_id = job_id
        self.generation = generation
        self.retry_seconds = retry_seconds
        self.head = head  # the service's Ray head this driver runs on (None: its own Ray, or a cluster)

    def check_head(self) -> None:
        """Hand the job back and exit at once if the service's Ray head this driver runs on is gone."""
        if self.head is not None and not self.head.alive():
            self.hand_back()

    def hand_back(self) -> NoReturn:
        """The Ray this driver ran on is gone: requeue the job (not counted as a driver start) and exit, touching no
        trial; the scheduler resumes it once the head runs again. A job being cancelled is left to the reconciler,
        which closes it as cancelled."""
        log.error("job %s: the service's Ray head this driver ran on is gone; handing the job back", self.job_id)
        reason = "the service's Ray head stopped; resuming"
        try:
            requeue = self.store.requeue
            budget = min(self.retry_seconds, 30.0)
            retry(
                lambda: requeue(self.job_id, reason, generation=self.generation, count_start=False),
                what="handing the job back",
                budget=budget,
            )
        except Exception:  # the reconciler requeues it once it sees this driver gone
            log.exception("job %s: could not requeue the job", self.job_id)
        logging.shutdown()
        os._exit(EXIT_RAY_LOST)

    def _write(self, what: str, call: Callable[[], T]) -> T:
        self.check_head()
        try:
            return retry(call, what=what, budget=self.retry_seconds)
        except FencedError as error:
            abandon(str(error))

    def heartbeat(self) -> str | None:
        return self._write("a heartbeat", lambda: self.store.heartbeat(self.job_id, self.generation))

    def check(self) -> None:
        """Exit at once unless the job is still this driver's (called right before each write to the studies, whose
        own retries cover a busy database), and while the Ray it runs on lives."""
        self.check_head()
        try:
            self.store.check_driver(self.job_id, self.generation)
        except FencedError as error:
            abandon(str(error))

    def progress(self, progress: Mapping[str, Mapping[str, int]]) -> None:
        self._write(
            "the job's progress", lambda: self.store.set_progress(self.job_id, progress, generation=self.generation)
        )

    def event(self, kind: str, data: Mapping[str, Any]) -> None:
        self._write(
            f"the {kind} event", lambda: self.store.add_event(self.job_id, kind, data, generation=self.generation)
        )

    def finish(self, state: str, error: str | None = None) -> None:
        finished = self._write(
            "the job's end", lambda: self.store.finish(self.job_id, state, error, generation=self.generation)
        )
        if not finished:
            abandon(f"job {self.job_id} was no longer this driver's (generation {self.generation}) when it ended")


def bound_transactions(engine: sa.Engine, seconds: float) -> None:
    """On PostgreSQL, have the server end a transaction of this process left idle for `seconds` (the process was
    paused in the middle of it), so its locks cannot stall the scheduler that replaces this driver, nor the new
    driver. (On SQLite a paused driver's lock is released by killing it, which the scheduler does on its host.)"""
    if engine.dialect.name != "postgresql":
        return

    @sa.event.listens_for(engine, "connect")
    def _bound(dbapi_connection: Any, record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(f"SET idle_in_transaction_session_timeout = {max(1, round(seconds * 1000))}")
        cursor.close()
        dbapi_connection.commit()

    engine.dispose()  # connections made before the listener are replaced


def connect(settings: Settings) -> tuple[Store, optuna.storages.BaseStorage]:
    """The driver's connections: our tables and the Optuna studies, each with bounded idle transactions."""
    store = Store(settings.database_url)
    bound_transactions(store.engine, settings.stale_seconds)
    studies = storage_for(settings.database_url)
    bound_transactions(studies.engine, settings.stale_seconds)  # type: ignore[attr-defined]  # an RDBStorage
    return store, studies


def drive(
    job_id: str,
    generation: int,
    settings: Settings,
    connections: tuple[Store, optuna.storages.BaseStorage] | None = None,
) -> str:
    """Run job `job_id` to its end as its driver of `generation`; returns the final state. `connections`: made
    beforehand (a standby's), else now."""
    store, studies = connections or connect(settings)
    lease = Lease(store, job_id, generation, settings.db_retry_seconds, AttachedHead.from_env())
    initial = lease.heartbeat()  # first of all: is this start still the job's? (if not, exit here)
    job = retry(lambda: store.get_job(job_id), what="reading the job", budget=settings.db_retry_seconds)
    if job is None:
        raise LookupError(f"no job {job_id} in {settings.database_url}")
    storage = GuardedStorage(optuna.storages.get_storage(studies), lease.check, settings.db_retry_seconds)
    try:
        spec = JobSpec.parse(job.spec, settings.limits)
    except SpecError as error:  # e.g. an optimizer that is no longer installed: the job cannot be resumed
        optimizers = optimizer_names(job.spec) or None
        return _fail(
            lease, storage, settings, optimizers, "the job spec is no longer valid", f"invalid job spec: {error}"
        )

    stop = threading.Event()
    beating = _keep_beating(lease, settings, stop, job_id)
    if initial == "cancelling":
        stop.set()
    if spec.upload is not None:  # the workload ships with the job: Ray takes it to the nodes, it is checked there
        try:
            spec = prepare_job(store, settings, spec, scratch_dir(settings, job_id) / "upload")
        except WorkloadCheckError as error:
            beating.set()
            ray.shutdown()
            optimizers = [entry.name for entry in spec.optimizers]
            return _fail(lease, storage, settings, optimizers, "the uploaded workload cannot run", str(error))

    recorder = Recorder(storage, job_id, spec)
    progress = _progress_from_studies(recorder, spec)
    lease.progress(progress)
    try:
        outcome = run_job(
            spec,
            recorder,
            stop=stop,
            on_event=_event_writer(lease, progress),
            storage_path=scratch_dir(settings, job_id) / f"g{generation}",
            trial_time_limit_s=settings.max_trial_seconds,
            job_time_limit_s=settings.max_job_seconds,
            job_elapsed_s=_elapsed(store, job, settings),
        )
    finally:
        beating.set()
        if spec.upload is not None:
            ray.shutdown()  # connected by prepare_job (run_job leaves alone a connection it did not make)
    lease.progress(_progress_from_studies(recorder, spec))
    lease.finish(outcome.state, outcome.error)
    _clean_up(settings, job_id)
    return outcome.state


def _fail(
    lease: Lease,
    storage: optuna.storages.BaseStorage,
    settings: Settings,
    optimizers: list[str] | None,
    reason: str,
    error: str,
) -> str:
    """End the job as failed before any trial ran: its RUNNING trials (from an earlier start) closed with `reason`."""
    close_running(storage, lease.job_id, reason, TrialState.FAIL, optimizers)
    lease.finish("failed", error)
    _clean_up(settings, lease.job_id)
    return "failed"


def _keep_beating(lease: Lease, settings: Settings, stop: threading.Event, job_id: str) -> threading.Event:
    """Heartbeats every `heartbeat_seconds` in a thread, until the returned event is set; a cancel seen by a
    heartbeat, SIGTERM or SIGINT sets `stop`."""
    beating = threading.Event()

    def heartbeat() -> None:
        while not beating.wait(settings.heartbeat_seconds):
            try:
                if lease.heartbeat() == "cancelling":
                    stop.set()
            except Exception:  # a database outage must not kill the driver; the next beat tries again
                log.exception("heartbeat of job %s failed", job_id)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    threading.Thread(target=heartbeat, name="heartbeat", daemon=True).start()
    return beating


def _event_writer(lease: Lease, progress: dict[str, dict[str, int]]) -> Callable[[TrialEvent], None]:
    """The engine's trial events as the job's events and progress."""

    def on_event(event: TrialEvent) -> None:
        where = {"optimizer": event.optimizer, "phase": event.phase, "seed": event.seed}
        if event.kind == "epoch":
            lease.event("epoch", {**where, "epoch": event.epoch, "value": event.value})
        elif event.kind == "started":
            lease.event("trial", {**where, "state": "running"})
        else:
            counts = progress[event.optimizer]
            counts["done"] = min(counts["done"] + 1, counts["total"])
            lease.progress(progress)
            lease.event("trial", {**where, "state": (event.state or "").lower()})

    return on_event


def _elapsed(store: Store, job: JobRow, settings: Settings) -> float:
    """Seconds the job has run: its clock started at its first start (by the database's clock), so a resumed job
    has what is left."""
    now = retry(store.db_now, what="reading the database's clock", budget=settings.db_retry_seconds)
    return max(0.0, (now - job.started_at).total_seconds()) if job.started_at is not None else 0.0


def _clean_up(settings: Settings, job_id: str) -> None:
    """The job has ended: its scratch (Tune's directory with the trials' checkpoints, this driver's working
    directory) goes now, or after `keep_scratch_seconds`, when the scheduler removes it."""
    if settings.keep_scratch_seconds <= 0:
        remove_scratch(settings, job_id)


def _progress_from_studies(recorder: Recorder, spec: JobSpec) -> dict[str, dict[str, int]]:
    progress = {}
    for entry in spec.optimizers:
        total = spec.trials_of(entry)
        trials = recorder.study(entry.name).get_trials(deepcopy=False)
        done = sum(t.state.is_finished() for t in trials)
        progress[entry.name] = {"done": min(done, total), "total": total}
    return progress


def warm_up() -> None:
    """Load what a driver's first job would otherwise wait for: torch and the modules Ray Tune imports when a run
    starts (its TensorBoard logger imports torch), and KOALA's fused CPU kernels (the engine loads them before the
    first trial)."""
    import ray.tune.execution.tune_controller  # noqa: F401

    from koala import cpu_kernels

    with contextlib.suppress(ImportError):  # Tune's TensorBoard logger, where installed
        import tensorboardX  # type: ignore[import-untyped]  # noqa: F401

    cpu_kernels.warm_up()


def standby() -> tuple[str, int, Settings, tuple[Store, optuna.storages.BaseStorage]] | None:
    """Warm up, then wait for a job from the scheduler (see the module's docstring); None at the end of input."""
    warm_up()
    settings = Settings()
    connections = connect(settings)
    home = Path.cwd()
    (home / STANDBY_READY).write_text(f"{os.getpid()}\n")
    log.info("standby driver ready (pid %d)", os.getpid())
    line = sys.stdin.readline()
    if not line.strip():
        shutil.rmtree(home, ignore_errors=True)
        return None
    order = json.loads(line)
    job_id, generation = str(order["job_id"]), int(order["generation"])
    os.environ.update({str(k): str(v) for k, v in order.get("env", {}).items()})
    os.chdir(order["workdir"])
    shutil.rmtree(home, ignore_errors=True)
    settings = Settings()
    # From now on this process is the job's driver: its output goes to the job's log, like a driver started for it.
    with open(settings.data_dir / "logs" / f"{job_id}.log", "ab") as output:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(output.fileno(), 1)
        os.dup2(output.fileno(), 2)
    log.info("standby driver (pid %d) takes job %s, generation %d", os.getpid(), job_id, generation)
    return job_id, generation, settings, connections


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args != [STANDBY_FLAG] and (len(args) != 2 or not args[1].isdigit()):
        print(f"usage: python -P -m service.worker JOB_ID GENERATION | {STANDBY_FLAG}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")  # our SIGINT/SIGTERM handler stops the job
    connections = None
    if args == [STANDBY_FLAG]:
        order = standby()
        if order is None:
            return 0
        job_id, generation, settings, connections = order
    else:
        job_id, generation, settings = args[0], int(args[1]), Settings()
    try:
        state = drive(job_id, generation, settings, connections)
    except DatabaseUnavailableError as error:
        log.error("job %s: %s; stopping (the scheduler resumes the job once the database answers)", job_id, error)
        return EXIT_DATABASE
    log.info("job %s %s", job_id, state)
    return 0


if __name__ == "__main__":
    sys.exit(main())
