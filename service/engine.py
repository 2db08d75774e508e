"""The comparison engine: a JobSpec becomes Ray Tune trials whose results the driver records in Optuna.

One Ray Tune run executes every trial of a job: `JobSearcher` (service/searcher.py) plans them and records them in
Optuna, `run_trial` (service/trial.py) trains one on a Ray worker with `koala.train.run`, and service/tune_control.py
holds the schedulers and callbacks through which the driver steers the run.

Time limits: a trial running longer than its wall-clock limit is stopped and recorded as FAIL ("time limit"); a job
running longer than its limit is stopped, its unfinished trials recorded as FAIL ("job time limit"), and it ends
failed. The limits are the JobSpec's `trial_time_limit_s` and `job_time_limit_s`, capped by the caller's (the
service's settings). A job in which no trial completed ends failed, saying why its trials failed.

Ray: `RAY_ADDRESS` set means that cluster (for a service driver, usually the service's own Ray head, see
service/ray_head.py); unset means a local Ray started for the run and shut down after it (`koala run`).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import ray
from optuna.trial import TrialState
from ray import tune
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from service.jobspec import JobSpec
from service.recorder import Recorder
from service.searcher import JOB_TIME_LIMIT, EventSink, JobSearcher, TrialEvent
from service.trial import run_trial
from service.tune_control import StopFlag, TrialStarts, TrialTimeLimit, TuningOnlyASHA

__all__ = ["EventSink", "JobOutcome", "TrialEvent", "check_resources", "effective_limit", "run_job"]

log = logging.getLogger(__name__)


def check_resources(spec: JobSpec) -> None:
    """Fail now, naming the field, when no node of the Ray cluster can ever hold one trial (Tune would wait forever).

    On an autoscaling cluster, give the autoscaler a node type with those resources (it counts once it exists)."""
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]  # type: ignore[no-untyped-call]
    cpu, gpu = spec.resources.cpu, spec.resources.gpu
    if not any(r.get("CPU", 0) >= cpu and r.get("GPU", 0) >= gpu for r in nodes):
        have = "; ".join(f"{r.get('CPU', 0):g} CPU, {r.get('GPU', 0):g} GPU" for r in nodes) or "none"
        raise ValueError(
            f"resources: a trial asks for {cpu:g} CPU and {gpu:g} GPU on one node, and no node of the Ray cluster "
            f"has that (nodes: {have})"
        )


def warm_up_cpu_kernels(spec: JobSpec) -> None:
    """Compile KOALA's CPU kernels (or load them from Numba's on-disk cache) here, once, before any trial starts.

    The first process on a machine pays several seconds of compilation; in a trial that one-off cost would be
    counted as KOALA's training compute and distort the report's compute and HPO cost figures. (Each trial process
    still loads them from the cache: `run_trial` does that before its clock starts.)"""
    if not any(entry.name.startswith("koala") for entry in spec.optimizers):
        return
    from koala import cpu_kernels

    cpu_kernels.warm_up()


@dataclass
class JobOutcome:
    """How a run ended: state is succeeded, cancelled or failed."""

    state: str
    error: str | None = None
    seconds: float = 0.0


def effective_limit(*limits: float | None) -> float | None:
    """The tightest of the given time limits (None: no limit)."""
    given = [float(limit) for limit in limits if limit is not None]
    return min(given) if given else None


def run_job(
    spec: JobSpec,
    recorder: Recorder,
    *,
    stop: threading.Event | None = None,
    on_event: EventSink | None = None,
    storage_path: str | os.PathLike[str] | None = None,
    max_failures: int = 2,
    trial_time_limit_s: float | None = None,
    job_time_limit_s: float | None = None,
    job_elapsed_s: float = 0.0,
) -> JobOutcome:
    """Execute every planned trial of `spec` on Ray Tune, recording in `recorder`'s studies.

    Time limits: the spec's `trial_time_limit_s` and `job_time_limit_s`, each capped by the argument of the same
    name (the service's limits); `job_elapsed_s` is what the job already ran before this run (a resumed job).

    Whatever ends the run (success, `stop`, the job's time limit, an error, Ctrl-C), no trial is left RUNNING: trials
    a stop interrupted are closed as PRUNED ("cancelled"), trials the time limit interrupted or an error left behind
    as FAIL.
    """
    stop = stop or threading.Event()
    timed_out = threading.Event()
    trial_limit = effective_limit(spec.trial_time_limit_s, trial_time_limit_s)
    job_limit = effective_limit(spec.job_time_limit_s, job_time_limit_s)
    timer: threading.Timer | None = None
    started_ray = False
    started = time.perf_counter()
    if job_limit is not None and job_elapsed_s >= job_limit:  # a resumed job with no time left
        closed = recorder.close_dangling(JOB_TIME_LIMIT)
        return JobOutcome("failed", _time_limit_error(job_limit, closed), 0.0)
    scratch = Path(storage_path) if storage_path is not None else Path(tempfile.mkdtemp(prefix="koala-tune-"))
    try:
        if job_limit is not None:
            timer = threading.Timer(job_limit - job_elapsed_s, timed_out.set)
            timer.daemon = True
            timer.start()
        started_ray = _connect_ray()
        check_resources(spec)
        warm_up_cpu_kernels(spec)
        searcher = JobSearcher(spec, recorder, stop, on_event, timed_out=timed_out)
        tuner = _tuner(spec, searcher, scratch, StopFlag(stop, timed_out), trial_limit, max_failures)
        tuner.fit()
        outcome = _outcome(recorder, stop, timed_out, job_limit)
        return JobOutcome(outcome.state, outcome.error, time.perf_counter() - started)
    except KeyboardInterrupt:
        recorder.close_dangling("cancelled", TrialState.PRUNED)
        raise
    except Exception as error:  # recorded as the job's error; the trials are closed either way
        log.exception("job %s failed", recorder.job_id)
        recorder.close_dangling(f"job failed: {error}")
        return JobOutcome("failed", f"{type(error).__name__}: {error}", time.perf_counter() - started)
    finally:
        if timer is not None:
            timer.cancel()
        if started_ray:
            ray.shutdown()
        if storage_path is None:
            shutil.rmtree(scratch, ignore_errors=True)


def _connect_ray() -> bool:
    """Connect to the Ray in `RAY_ADDRESS` unless this process already is; without one, start a local Ray and return
    True (the caller shuts it down after the run)."""
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    # "local": never attach to a cluster some earlier `ray start` left recorded on this machine.
    ray.init(address=address or "local", include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    return not address


def _tuner(
    spec: JobSpec,
    searcher: JobSearcher,
    scratch: Path,
    stopper: StopFlag,
    trial_limit: float | None,
    max_failures: int,
) -> tune.Tuner:
    """The job's one Ray Tune run: the searcher's trials, each with the spec's resources, stopped by `stopper`."""
    trainable = tune.with_resources(run_trial, {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})
    inner: TrialScheduler = FIFOScheduler()  # type: ignore[no-untyped-call]
    if spec.scheduler == "asha":
        inner = TuningOnlyASHA(spec)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=TrialTimeLimit(inner, trial_limit, searcher),
            num_samples=spec.planned_trials(),
            max_concurrent_trials=spec.max_concurrent_trials,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=f"job-{searcher.recorder.job_id}",
            storage_path=str(scratch.resolve()),
            stop=stopper,
            callbacks=[TrialStarts(searcher)],
            failure_config=tune.FailureConfig(max_failures=max_failures),
            # Only the newest checkpoint of a trial is needed (to retry it after its node died).
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            verbose=0,
        ),
    )


def _outcome(
    recorder: Recorder, stop: threading.Event, timed_out: threading.Event, job_limit: float | None
) -> JobOutcome:
    """How the finished Tune run ends the job (its seconds are the caller's to fill in), with every trial closed."""
    if stop.is_set():
        recorder.close_dangling("cancelled", TrialState.PRUNED)
        return JobOutcome("cancelled")
    if timed_out.is_set():
        assert job_limit is not None
        closed = recorder.close_dangling(JOB_TIME_LIMIT)
        return JobOutcome("failed", _time_limit_error(job_limit, closed))
    left = recorder.close_dangling("the run ended before this trial finished")
    if left:
        return JobOutcome("failed", f"{left} trial(s) did not finish")
    if (failed := _all_failed(recorder)) is not None:
        return JobOutcome("failed", failed)
    return JobOutcome("succeeded")


def _time_limit_error(limit: float, interrupted: int) -> str:
    return f"job time limit of {limit:g} s reached; {interrupted} running trial(s) stopped"


def _all_failed(recorder: Recorder) -> str | None:
    """None if some trial of the job completed; otherwise why they failed, e.g. "every trial failed (4: diverged 2,
    time limit 2)"."""
    trials = [
        t
        for entry in recorder.spec.optimizers
        for t in recorder.study(entry.name).get_trials(deepcopy=False)
        if "phase" in t.user_attrs  # a trial without one was never started (see Recorder.close_orphans)
    ]
    if any(t.state == TrialState.COMPLETE for t in trials):
        return None
    reasons = Counter(str(t.user_attrs.get("reason") or t.state.name.lower()) for t in trials)
    summary = ", ".join(f"{reason} {count}" for reason, count in reasons.most_common())
    return f"every trial failed ({len(trials)}: {summary})" if trials else "no trial ran"
