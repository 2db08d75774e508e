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
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Any, NoReturn, TypeVar

import optuna
import ray
import sqlalchemy as sa
from optuna.trial import TrialState

from service.engine import TrialEvent, run_job
from service.jobspec import JobSpec, SpecError
from service.recorder import GuardedStorage, Recorder, close_running, optimizer_names, storage_for
from service.retry import DatabaseUnavailableError, retry
from service.scheduler import remove_scratch, scratch_dir
from service.settings import Settings
from service.store import FencedError, Store
from service.uploads import WorkloadCheckError, prepare_job

log = logging.getLogger("service.worker")
T = TypeVar("T")

EXIT_FENCED = 3  # another driver owns the job: this one stopped without touching it
EXIT_DATABASE = 4  # the database stayed unavailable longer than db_retry_seconds


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

    def __init__(self, store: Store, job_id: str, generation: int, retry_seconds: float) -> None:
        self.store = store
        self.job_id = job_id
        self.generation = generation
        self.retry_seconds = retry_seconds

    def _write(self, what: str, call: Callable[[], T]) -> T:
        try:
            return retry(call, what=what, budget=self.retry_seconds)
        except FencedError as error:
            abandon(str(error))

    def heartbeat(self) -> str | None:
        return self._write("a heartbeat", lambda: self.store.heartbeat(self.job_id, self.generation))

    def check(self) -> None:
        """Exit at once unless the job is still this driver's (called right before each write to the studies, whose
        own retries cover a busy database)."""
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


def drive(job_id: str, generation: int, settings: Settings) -> str:
    """Run job `job_id` to its end as its driver of `generation`; returns the final state."""
    store = Store(settings.database_url)
    bound_transactions(store.engine, settings.stale_seconds)
    lease = Lease(store, job_id, generation, settings.db_retry_seconds)
    initial = lease.heartbeat()  # first of all: is this start still the job's? (if not, exit here)
    job = retry(lambda: store.get_job(job_id), what="reading the job", budget=settings.db_retry_seconds)
    if job is None:
        raise LookupError(f"no job {job_id} in {settings.database_url}")
    studies = storage_for(settings.database_url)
    bound_transactions(studies.engine, settings.stale_seconds)  # type: ignore[attr-defined]  # an RDBStorage
    storage = GuardedStorage(optuna.storages.get_storage(studies), lease.check, settings.db_retry_seconds)
    try:
        spec = JobSpec.parse(job.spec, settings.limits)
    except SpecError as error:  # e.g. an optimizer that is no longer installed: the job cannot be resumed
        close_running(
            storage, job_id, "the job spec is no longer valid", TrialState.FAIL, optimizer_names(job.spec) or None
        )
        lease.finish("failed", f"invalid job spec: {error}")
        _clean_up(settings, job_id)
        return "failed"

    stop = threading.Event()
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
    if initial == "cancelling":
        stop.set()
    threading.Thread(target=heartbeat, name="heartbeat", daemon=True).start()

    if spec.upload is not None:  # the workload ships with the job: Ray takes it to the nodes, it is checked there
        try:
            spec = prepare_job(store, settings, spec, scratch_dir(settings, job_id) / "upload")
        except WorkloadCheckError as error:
            beating.set()
            ray.shutdown()
            optimizers = [entry.name for entry in spec.optimizers]
            close_running(storage, job_id, "the uploaded workload cannot run", TrialState.FAIL, optimizers)
            lease.finish("failed", str(error))
            _clean_up(settings, job_id)
            return "failed"

    recorder = Recorder(storage, job_id, spec)
    progress = _progress_from_studies(recorder, spec)
    lease.progress(progress)

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

    # The job's clock started at its first start (by the database's clock): a resumed job has what is left.
    started_at = job.started_at
    now = retry(store.db_now, what="reading the database's clock", budget=settings.db_retry_seconds)
    elapsed = (now - started_at).total_seconds() if started_at is not None else 0.0
    try:
        outcome = run_job(
            spec,
            recorder,
            stop=stop,
            on_event=on_event,
            storage_path=scratch_dir(settings, job_id) / f"g{generation}",
            trial_time_limit_s=settings.max_trial_seconds,
            job_time_limit_s=settings.max_job_seconds,
            job_elapsed_s=max(0.0, elapsed),
        )
    finally:
        beating.set()
        if spec.upload is not None:
            ray.shutdown()  # connected by prepare_job (run_job leaves alone a connection it did not make)
    lease.progress(_progress_from_studies(recorder, spec))
    lease.finish(outcome.state, outcome.error)
    _clean_up(settings, job_id)
    return outcome.state


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


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or not args[1].isdigit():
        print("usage: python -P -m service.worker JOB_ID GENERATION", file=sys.stderr)
        return 2
    job_id, generation = args[0], int(args[1])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")  # our SIGINT/SIGTERM handler stops the job
    try:
        state = drive(job_id, generation, Settings())
    except DatabaseUnavailableError as error:
        log.error("job %s: %s; stopping (the scheduler resumes the job once the database answers)", job_id, error)
        return EXIT_DATABASE
    log.info("job %s %s", job_id, state)
    return 0


if __name__ == "__main__":
    sys.exit(main())
