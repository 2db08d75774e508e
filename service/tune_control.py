"""How the driver steers Ray Tune's run: which trials ASHA may stop, per-trial time limits, when a trial really
starts, and stopping everything (a cancel, Ctrl-C, the job's time limit).

Tune pickles these objects with the run's state; the live searcher and flags stay in the driver (`__getstate__`).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from ray import tune
from ray.tune.experiment import Trial as TuneTrial
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler

from service.jobspec import JobSpec
from service.searcher import JobSearcher
from service.trial import OBJECTIVE, TrialConfig

log = logging.getLogger(__name__)


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
        config = TrialConfig.of(trial.config)
        return self.schedulers.get(config.optimizer) if config is not None and config.phase == "tune" else None

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
