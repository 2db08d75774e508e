"""The driver of one job: `python -m service.worker JOB_ID`.

The scheduler starts it in its own process group, so it outlives the API process (a restarted API finds it by its
heartbeat). It runs the job through the engine `koala run` uses, is the only writer to the job's Optuna studies,
writes progress and events to our tables, stops gracefully when the job is set to `cancelling` (or on SIGTERM), and
ends the job as succeeded, cancelled or failed. Started again for a job whose earlier driver died, it resumes: the
engine skips finished trials and re-runs the ones left RUNNING.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from types import FrameType

from optuna.trial import TrialState

from service.engine import Event, run_job
from service.jobspec import JobSpec, SpecError
from service.recorder import Recorder, close_running, storage_for
from service.settings import Settings
from service.store import Store

log = logging.getLogger("service.worker")


def drive(job_id: str, settings: Settings) -> str:
    """Run job `job_id` to its end; returns the final state."""
    store = Store(settings.database_url)
    job = store.get_job(job_id)
    if job is None:
        raise LookupError(f"no job {job_id} in {settings.database_url}")
    storage = storage_for(settings.database_url)
    try:
        spec = JobSpec.parse(job.spec, settings.limits)
    except SpecError as error:  # e.g. an optimizer that is no longer installed: the job cannot be resumed
        close_running(storage, job_id, "the job spec is no longer valid", TrialState.FAIL)
        store.finish(job_id, "failed", f"invalid job spec: {error}")
        return "failed"

    stop = threading.Event()
    beating = threading.Event()

    def heartbeat() -> None:
        while not beating.wait(settings.heartbeat_seconds):
            try:
                if store.heartbeat(job_id) == "cancelling":
                    stop.set()
            except Exception:  # a database hiccup must not kill the driver; the next beat retries
                log.exception("heartbeat of job %s failed", job_id)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if store.heartbeat(job_id) == "cancelling":
        stop.set()
    threading.Thread(target=heartbeat, name="heartbeat", daemon=True).start()

    recorder = Recorder(storage, job_id, spec)
    progress = _progress_from_studies(recorder, spec)
    store.set_progress(job_id, progress)

    def on_event(event: Event) -> None:
        where = {"optimizer": event.optimizer, "phase": event.phase, "seed": event.seed}
        if event.kind == "epoch":
            store.add_event(job_id, "epoch", {**where, "epoch": event.epoch, "value": event.value})
        elif event.kind == "started":
            store.add_event(job_id, "trial", {**where, "state": "running"})
        else:
            counts = progress[event.optimizer]
            counts["done"] = min(counts["done"] + 1, counts["total"])
            store.set_progress(job_id, progress)
            store.add_event(job_id, "trial", {**where, "state": (event.state or "").lower()})

    scratch = settings.data_dir / "tune" / job_id
    try:
        outcome = run_job(spec, recorder, stop=stop, on_event=on_event, storage_path=scratch)
    finally:
        beating.set()
    store.set_progress(job_id, _progress_from_studies(recorder, spec))
    store.finish(job_id, outcome.state, outcome.error)
    return outcome.state


def _progress_from_studies(recorder: Recorder, spec: JobSpec) -> dict[str, dict[str, int]]:
    progress = {}
    for entry in spec.optimizers:
        total = (entry.trials or 0) + len(spec.seed_list)
        trials = recorder.study(entry.name).get_trials(deepcopy=False)
        done = sum(t.state.is_finished() for t in trials)
        progress[entry.name] = {"done": min(done, total), "total": total}
    return progress


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m service.worker JOB_ID", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")  # our SIGINT/SIGTERM handler stops the job
    state = drive(args[0], Settings())
    log.info("job %s %s", args[0], state)
    return 0


if __name__ == "__main__":
    sys.exit(main())
