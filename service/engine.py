"""The comparison engine: a JobSpec becomes Ray Tune trials whose results the driver records in Optuna.

Planning. A fixed optimizer runs once per seed (phase `eval`). A tuned optimizer first runs `trials` TPE proposals
on the first seed (phase `tune`, optionally early-stopped by ASHA), then its best configuration once per seed
(phase `eval`). One Ray Tune run executes everything: `JobSearcher`, in the driver process, hands out the planned
trials as Tune asks for them (eval trials once their optimizer's tuning has finished) and records every start,
epoch and end in Optuna, so the driver is the only writer. `koala.train.run` does the training inside the trial.

Time limits: a trial running longer than its wall-clock limit is stopped and recorded as FAIL ("time limit"); a job
running longer than its limit is stopped, its unfinished trials recorded as FAIL ("job time limit"), and it ends
failed. The limits are the JobSpec's `trial_time_limit_s` and `job_time_limit_s`, capped by the caller's (the
service's settings). A job in which no trial completed ends failed, saying why its trials failed.

Ray: `RAY_ADDRESS` set means that cluster (for a service driver, usually the service's own Ray head, see
service/ray_head.py); unset means a local Ray started for the run and shut down after it (`koala run`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import ray
from optuna.trial import TrialState
from ray import tune
from ray.tune.experiment import Trial as TuneTrial
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from service.jobspec import JobSpec, OptimizerEntry
from service.recorder import OpenTrial, Phase, Recorder, finished_trials

log = logging.getLogger(__name__)
OBJECTIVE = "objective"  # the JobSpec metric, under one name for Tune's schedulers
TRIAL_TIME_LIMIT = "time limit"  # the reason of a trial stopped for running past the trial time limit
JOB_TIME_LIMIT = "job time limit"  # the reason of a trial the job's time limit interrupted
TIMING_FILE = "koala-timing.json"  # per-epoch and wall seconds, saved with a trial's checkpoint for retries


@dataclass(frozen=True)
class TrialEvent:
    """Progress of a job, for live displays: kind is started, epoch or finished."""

    kind: str
    optimizer: str
    phase: Phase
    seed: int
    epoch: int = 0
    value: float | None = None
    state: str | None = None


EventSink = Callable[[TrialEvent], None]


@dataclass
class _Planned:
    entry: OptimizerEntry
    phase: Phase
    seed: int
    fixed: dict[str, Any] = field(default_factory=dict)
    adopt: optuna.trial.FrozenTrial | None = None  # a trial a dead driver left RUNNING, re-run in place


class JobSearcher(Searcher):
    """Hands out the job's planned trials and records them in Optuna (runs in the driver)."""

    def __init__(
        self,
        spec: JobSpec,
        recorder: Recorder,
        stop: threading.Event,
        on_event: EventSink | None = None,
        *,
        timed_out: threading.Event | None = None,
    ) -> None:
        super().__init__(metric=OBJECTIVE, mode="max" if spec.direction == "maximize" else "min")
        self.spec = spec
        self.stop = stop  # cancelled (the service's cancel, Ctrl-C)
        self.timed_out = timed_out or threading.Event()  # the job ran out of time
        # Tune trial ids stopped for running past the trial time limit -> the seconds they ran
        self.time_limited: dict[str, float] = {}
        self.recorder = recorder
        self.on_event = on_event or (lambda event: None)
        self.ready: deque[_Planned] = deque()
        self.tuning_left: dict[str, int] = {}
        recorder.close_orphans()
        for entry in spec.optimizers:
            self._plan(entry)
        self.running: dict[str, OpenTrial] = {}
        self.lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its configuration to disk for restores; this searcher's live state (database, lock, callbacks)
        # stays in the driver, and a job resumes from its Optuna studies instead.
        unpicklable = {"recorder", "lock", "on_event", "running", "stop", "timed_out"}
        return {k: v for k, v in self.__dict__.items() if k not in unpicklable}

    # ---- Searcher interface ----------------------------------------------------------------------------------------

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:  # type: ignore[override]  # FINISHED is a str
        with self.lock:
            if self.stop.is_set() or self.timed_out.is_set():
                return Searcher.FINISHED
            if not self.ready:
                return Searcher.FINISHED if not self.tuning_left else None  # eval trials wait for their tuning
            planned = self.ready.popleft()
            if planned.adopt is not None:
                opened = self.recorder.adopt(planned.adopt)
            else:
                opened = self.recorder.open(planned.entry, planned.phase, planned.seed, planned.fixed)
            self.running[trial_id] = opened
        self.on_event(TrialEvent("started", planned.entry.name, planned.phase, planned.seed))
        return {
            "optimizer": planned.entry.name,
            "hyperparams": opened.hyperparams,
            "phase": planned.phase,
            "seed": planned.seed,
            "workload": self.spec.workload,
            "workload_config": dict(self.spec.workload_config),
            "epochs": self.spec.epochs,
            "metric": self.spec.metric_name,
            "gpu": self.spec.resources.gpu,
            "cpu": self.spec.resources.cpu,
        }

    def on_trial_running(self, trial_id: str) -> None:
        """Tune started the trial on a Ray worker (it holds its resources from now): its `run_started_at`."""
        opened = self.running.get(trial_id)
        if opened is not None:
            Recorder.mark_running(opened)

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        opened = self.running.get(trial_id)
        if opened is None or "epoch" not in result or result.get("diverged"):
            return
        value = float(result[OBJECTIVE])
        Recorder.report(opened, int(result["epoch"]), value)
        opened.trial.set_user_attr("epochs_done", int(result["epoch"]))
        if result.get("node") and result["node"] != opened.node:  # where it runs now (a retry may move it)
            opened.node = result["node"]
            opened.trial.set_user_attr("node", opened.node)
        self.on_event(TrialEvent("epoch", opened.optimizer, opened.phase, opened.seed, int(result["epoch"]), value))

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        with self.lock:
            opened = self.running.pop(trial_id, None)
            if opened is None:
                return
            state, value, reason = self._outcome(trial_id, result, error)
            attrs = {
                "epochs_done": int((result or {}).get("epoch", 0)),
                # A trial stopped at its time limit before it reported anything still spent that time.
                "wall_seconds": float((result or {}).get("wall_seconds", self.time_limited.get(trial_id, 0.0))),
                "epoch_seconds": list((result or {}).get("epoch_seconds", [])),
                "device": (result or {}).get("device", "unknown"),
                "node": (result or {}).get("node"),
                "diverged": bool((result or {}).get("diverged", False)),
            }
            Recorder.close(opened, state, value=value, reason=reason, attrs=attrs)
            optimizer = opened.optimizer
            if opened.phase == "tune":
                self.tuning_left[optimizer] -= 1
                if self.tuning_left[optimizer] == 0:
                    del self.tuning_left[optimizer]
                    self._plan_evaluation(optimizer)
        self.on_event(TrialEvent("finished", optimizer, opened.phase, opened.seed, state=state.name))

    # ---- internals -------------------------------------------------------------------------------------------------

    def _outcome(
        self, trial_id: str, result: Mapping[str, Any] | None, error: bool
    ) -> tuple[TrialState, float | None, str | None]:
        if trial_id in self.time_limited:
            return TrialState.FAIL, None, TRIAL_TIME_LIMIT
        if error:
            return TrialState.FAIL, None, str((result or {}).get("error", "the trial raised an error"))
        interrupted_by_time = self.timed_out.is_set() and not self.stop.is_set()
        if not result:
            if interrupted_by_time:
                return TrialState.FAIL, None, JOB_TIME_LIMIT
            return TrialState.PRUNED, None, "stopped before its first epoch"
        if result.get("diverged"):
            return TrialState.FAIL, None, "diverged"
        if int(result.get("epoch", 0)) < self.spec.epochs:
            if interrupted_by_time:
                return TrialState.FAIL, None, JOB_TIME_LIMIT
            return TrialState.PRUNED, None, "cancelled" if self.stop.is_set() else "early-stopped"
        value = float(result[OBJECTIVE])
        if not math.isfinite(value):
            return TrialState.FAIL, None, "non-finite metric"
        return TrialState.COMPLETE, value, None

    def _plan(self, entry: OptimizerEntry) -> None:
        """Queue what is left of `entry`'s plan. A fresh job has no trials yet; a resumed one skips finished trials
        and re-runs, in place, the ones its dead driver left RUNNING."""
        if not entry.tuned:
            self._plan_seeds(entry, dict(entry.params))
            return
        assert entry.trials is not None
        trials = self.recorder.study(entry.name).get_trials(deepcopy=False)
        tuning = [t for t in trials if t.user_attrs.get("phase") == "tune"]
        finished = sum(t.state.is_finished() for t in tuning)
        left = entry.trials - finished
        if left <= 0:
            self._plan_evaluation(entry.name)
            return
        self.tuning_left[entry.name] = left
        adopted = [t for t in tuning if t.state == TrialState.RUNNING][:left]
        seed = self.spec.seed_list[0]
        self.ready.extend(_Planned(entry, "tune", seed, adopt=t) for t in adopted)
        self.ready.extend(_Planned(entry, "tune", seed) for _ in range(left - len(adopted)))

    def _plan_seeds(self, entry: OptimizerEntry, params: dict[str, Any]) -> None:
        """Queue `params` on every seed that has no evaluation trial of `entry` yet (or only a RUNNING one)."""
        trials = self.recorder.study(entry.name).get_trials(deepcopy=False)
        evaluation = {int(t.user_attrs["seed"]): t for t in trials if t.user_attrs.get("phase") == "eval"}
        for seed in self.spec.seed_list:
            earlier = evaluation.get(seed)
            if earlier is None:
                self.ready.append(_Planned(entry, "eval", seed, dict(params)))
            elif earlier.state == TrialState.RUNNING:
                self.ready.append(_Planned(entry, "eval", seed, adopt=earlier))

    def _plan_evaluation(self, optimizer: str) -> None:
        """Queue the best tuning configuration of `optimizer` on every seed."""
        entry = next(e for e in self.spec.optimizers if e.name == optimizer)
        best = best_tuning_trial(self.recorder.study(optimizer))
        if best is None:
            # Nothing to evaluate: record the eval trials as failed so the plan is complete and the reason visible.
            done = {t.user_attrs.get("seed") for t in finished_trials(self.recorder.study(optimizer), "eval")}
            for seed in self.spec.seed_list:
                if seed not in done:
                    opened = self.recorder.open(entry, "eval", seed, {})
                    Recorder.close(opened, TrialState.FAIL, reason="no tuning trial completed")
            return
        self._plan_seeds(entry, dict(best.params))


def best_tuning_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The completed tuning trial with the best value (pruned trials never count as best)."""
    completed = [t for t in finished_trials(study, "tune") if t.state == TrialState.COMPLETE and t.value is not None]
    if not completed:
        return None
    pick = max if study.direction == optuna.study.StudyDirection.MAXIMIZE else min
    return pick(completed, key=lambda t: t.value)  # type: ignore[arg-type, return-value]


class TuningOnlyASHA(FIFOScheduler):
    """ASHA for tuning trials only, one bracket set per optimizer; fixed and eval trials always run to the end."""

    def __init__(self, spec: JobSpec) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        mode = "max" if spec.direction == "maximize" else "min"
        self.schedulers = {
            entry.name: AsyncHyperBandScheduler(
                time_attr="epoch", metric=OBJECTIVE, mode=mode, max_t=spec.epochs, grace_period=1, reduction_factor=2
            )
            for entry in spec.optimizers
            if entry.tuned
        }

    def _for(self, trial: TuneTrial) -> TrialScheduler | None:
        config = trial.config
        return self.schedulers.get(config.get("optimizer", "")) if config.get("phase") == "tune" else None

    def on_trial_add(self, tune_controller: Any, trial: TuneTrial) -> None:
        if (scheduler := self._for(trial)) is not None:
            scheduler.on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: TuneTrial, result: dict[str, Any]) -> str:
        scheduler = self._for(trial)
        if scheduler is None or result.get("diverged") or "epoch" not in result:
            return TrialScheduler.CONTINUE
        return str(scheduler.on_trial_result(tune_controller, trial, result))

    def on_trial_complete(self, tune_controller: Any, trial: TuneTrial, result: dict[str, Any]) -> None:
        if (scheduler := self._for(trial)) is not None:
            scheduler.on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller: Any, trial: TuneTrial) -> None:
        if (scheduler := self._for(trial)) is not None:
            scheduler.on_trial_remove(tune_controller, trial)


class TrialStarts(tune.Callback):
    """Tells the searcher when Tune starts a trial on a Ray worker (a trial may wait for resources after Tune asked
    for it, e.g. on a Ray that other jobs share)."""

    def __init__(self, searcher: JobSearcher) -> None:
        self.searcher: JobSearcher | None = searcher

    def __getstate__(self) -> dict[str, Any]:
        return {"searcher": None}  # the live searcher stays in the driver

    def on_trial_start(self, iteration: int, trials: list[TuneTrial], trial: TuneTrial, **info: Any) -> None:
        if self.searcher is not None:
            self.searcher.on_trial_running(trial.trial_id)


class StopFlag(tune.Stopper):
    """Stops the whole run when one of `events` is set (the service's cancel, Ctrl-C in `koala run`, the job's time
    limit)."""

    def __init__(self, *events: threading.Event) -> None:
        self.events = events

    def __getstate__(self) -> dict[str, Any]:
        return {"events": ()}  # live flags: meaningless in the copy Tune writes to disk

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return self.stop_all()

    def stop_all(self) -> bool:
        return any(event.is_set() for event in self.events)


class TrialTimeLimit(FIFOScheduler):
    """The job's trial scheduler (`inner`) plus a wall-clock limit per trial, counted from when Tune first runs the
    trial (retries included): a trial past `limit` seconds is stopped at its next result, or at the next step of
    Tune's loop when it reports none (a stuck epoch), and the searcher records it as FAIL "time limit"."""

    def __init__(self, inner: TrialScheduler, limit: float | None, searcher: JobSearcher) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.inner = inner
        self.limit = limit
        self.searcher = searcher
        self.started: dict[str, float] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "searcher": None}  # the live searcher stays in the driver

    def _seconds(self, trial: TuneTrial) -> float:
        """How long `trial` has run (from when this scheduler first saw it running)."""
        return time.monotonic() - self.started.setdefault(trial.trial_id, time.monotonic())

    def _over(self, trial: TuneTrial) -> bool:
        return self.limit is not None and self._seconds(trial) > self.limit

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return bool(self.inner.set_search_properties(metric, mode, **spec))

    def on_trial_add(self, tune_controller: Any, trial: TuneTrial) -> None:
        self.inner.on_trial_add(tune_controller, trial)

    def on_trial_error(self, tune_controller: Any, trial: TuneTrial) -> None:
        self.inner.on_trial_error(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: TuneTrial, result: dict[str, Any]) -> str:
        final = result.get("diverged") or int(result.get("epoch", 0)) >= self.searcher.spec.epochs
        if self._over(trial) and not final:
            self.searcher.time_limited[trial.trial_id] = self._seconds(trial)
            return TrialScheduler.STOP
        return str(self.inner.on_trial_result(tune_controller, trial, result))

    def on_trial_complete(self, tune_controller: Any, trial: TuneTrial, result: dict[str, Any]) -> None:
        self.inner.on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller: Any, trial: TuneTrial) -> None:
        self.inner.on_trial_remove(tune_controller, trial)

    def choose_trial_to_run(self, tune_controller: Any) -> TuneTrial | None:
        # Called at every step of Tune's loop: the place to stop a trial that has gone silent past its limit.
        if self.limit is not None:
            for trial in list(tune_controller.get_live_trials()):
                running = trial.status == TuneTrial.RUNNING and trial.trial_id not in self.searcher.time_limited
                if running and self._over(trial):
                    log.warning("trial %s ran past its time limit of %g s; stopping it", trial.trial_id, self.limit)
                    self.searcher.time_limited[trial.trial_id] = self._seconds(trial)
                    tune_controller.stop_trial(trial)
        chosen: TuneTrial | None = self.inner.choose_trial_to_run(tune_controller)
        return chosen

    def debug_string(self) -> str:
        return str(self.inner.debug_string())


def run_trial(config: dict[str, Any]) -> None:
    """The Ray Tune trainable: one `koala.train.run`, reporting every epoch with a checkpoint for retries."""
    import torch
    import torch._dynamo  # imported here, before the clock (see below)

    from koala import cpu_kernels, train, workloads

    node = ray.get_runtime_context().get_node_id()  # which cluster node ran (the last attempt of) the trial
    wants_gpu = float(config["gpu"]) > 0
    device = "cuda" if wants_gpu and torch.cuda.is_available() else "cpu"
    torch.set_num_threads(max(1, int(config["cpu"])))
    # The clock (the trial's compute in the report) starts after what is not training, paid once per worker process:
    # torch's compiler stack, which torch imports at the first optimizer construction (1-2 s, hence the import
    # above), reading the data, and on the CPU loading KOALA's fused kernels (about a second, most of it Numba's
    # start-up). Each would dominate a small trial and weigh on whichever optimizer a fresh worker runs first.
    workload = workloads.get(config["workload"], **config["workload_config"])
    workload.prepare()
    if device == "cpu" and str(config["optimizer"]).startswith("koala"):
        cpu_kernels.warm_up()
    started = time.perf_counter()
    epoch_seconds: list[float] = []
    earlier_seconds = 0.0  # wall time of the attempts before a retry, so compute counts every attempt
    with tempfile.TemporaryDirectory(prefix="koala-trial-") as work:
        timing = Path(work) / TIMING_FILE
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:  # a retried trial (its node died): resume from the last epoch
            with checkpoint.as_directory() as saved:
                shutil.copytree(saved, work, dirs_exist_ok=True)
            if timing.exists():
                saved_timing = json.loads(timing.read_text())
                epoch_seconds, earlier_seconds = saved_timing["epoch_seconds"], saved_timing["wall_seconds"]

        def wall() -> float:
            return earlier_seconds + time.perf_counter() - started

        def report(epoch: int, metrics: dict[str, float]) -> None:
            epoch_seconds.append(metrics["epoch_seconds"])
            timing.write_text(json.dumps({"epoch_seconds": epoch_seconds, "wall_seconds": wall()}))
            tune.report(
                {
                    **metrics,
                    OBJECTIVE: metrics[config["metric"]],
                    "epoch": epoch,
                    "device": device,
                    "node": node,
                    "wall_seconds": wall(),
                    "epoch_seconds": list(epoch_seconds),
                },
                checkpoint=tune.Checkpoint.from_directory(work),
            )

        result = train.run(
            workload,
            config["optimizer"],
            config["hyperparams"],
            seed=int(config["seed"]),
            epochs=int(config["epochs"]),
            report=report,
            checkpoint_dir=work,
            device=device,
        )
        if result.diverged:
            tune.report(
                {
                    "diverged": True,
                    "epoch": result.diverged_at,
                    OBJECTIVE: math.nan,
                    "device": device,
                    "node": node,
                    "wall_seconds": wall(),
                    "epoch_seconds": list(epoch_seconds),
                }
            )


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
        if not ray.is_initialized():
            address = os.environ.get("RAY_ADDRESS")
            # "local": never attach to a cluster some earlier `ray start` left recorded on this machine.
            ray.init(
                address=address or "local", include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR
            )
            started_ray = not address
        check_resources(spec)
        warm_up_cpu_kernels(spec)
        searcher = JobSearcher(spec, recorder, stop, on_event, timed_out=timed_out)
        trainable = tune.with_resources(run_trial, {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})
        inner = TuningOnlyASHA(spec) if spec.scheduler == "asha" else FIFOScheduler()  # type: ignore[no-untyped-call]
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=searcher,
                scheduler=TrialTimeLimit(inner, trial_limit, searcher),
                num_samples=spec.planned_trials(),
                max_concurrent_trials=spec.max_concurrent_trials,
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=f"job-{recorder.job_id}",
                storage_path=str(scratch.resolve()),
                stop=StopFlag(stop, timed_out),
                callbacks=[TrialStarts(searcher)],
                failure_config=tune.FailureConfig(max_failures=max_failures),
                # Only the newest checkpoint of a trial is needed (to retry it after its node died).
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                verbose=0,
            ),
        )
        tuner.fit()
        if stop.is_set():
            recorder.close_dangling("cancelled", TrialState.PRUNED)
            return JobOutcome("cancelled", seconds=time.perf_counter() - started)
        if timed_out.is_set():
            assert job_limit is not None
            closed = recorder.close_dangling(JOB_TIME_LIMIT)
            return JobOutcome("failed", _time_limit_error(job_limit, closed), time.perf_counter() - started)
        left = recorder.close_dangling("the run ended before this trial finished")
        if left:
            return JobOutcome("failed", f"{left} trial(s) did not finish", time.perf_counter() - started)
        if (failed := _all_failed(recorder)) is not None:
            return JobOutcome("failed", failed, time.perf_counter() - started)
        return JobOutcome("succeeded", seconds=time.perf_counter() - started)
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
