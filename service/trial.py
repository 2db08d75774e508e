"""One trial: what it runs (`TrialConfig`) and the Ray Tune trainable that runs it (`run_trial`).

The searcher in the driver builds a `TrialConfig` for every trial it hands out; Tune keeps a trial's configuration as
a dict, so the config travels as its only entry, `{"trial": TrialConfig(...)}`, and Ray pickles it to the worker
that runs the trial. This module is what a Ray worker imports to run one: it needs neither Optuna nor the store.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from ray import tune

if TYPE_CHECKING:
    from service.recorder import Phase

OBJECTIVE = "objective"  # the JobSpec metric, under one name for Tune's schedulers
TIMING_FILE = "koala-timing.json"  # per-epoch and wall seconds, saved with a trial's checkpoint for retries
TUNE_KEY = "trial"  # the one entry of a Tune trial's config: its TrialConfig


@dataclass(frozen=True)
class TrialConfig:
    """Everything a Ray worker needs to run one trial of a job."""

    optimizer: str
    hyperparams: Mapping[str, Any]
    phase: Phase
    seed: int
    workload: str
    workload_config: Mapping[str, Any]
    epochs: int
    metric: str  # the workload metric reported as OBJECTIVE
    cpu: float
    gpu: float

    def __str__(self) -> str:
        # Tune names a trial's directory after its config: keep that short and readable.
        return f"{self.optimizer}-{self.phase}-seed{self.seed}"

    def as_tune_config(self) -> dict[str, TrialConfig]:
        return {TUNE_KEY: self}

    @staticmethod
    def of(tune_config: Mapping[str, Any]) -> TrialConfig | None:
        """The TrialConfig a Tune trial's config carries, or None for a trial that has none."""
        trial = tune_config.get(TUNE_KEY)
        return trial if isinstance(trial, TrialConfig) else None


def run_trial(config: dict[str, TrialConfig]) -> None:
    """The Ray Tune trainable: one `koala.train.run`, reporting every epoch with a checkpoint for retries."""
    import torch
    import torch._dynamo  # imported here, before the clock (see below)

    from koala import cpu_kernels, train, workloads

    trial = config[TUNE_KEY]
    node = ray.get_runtime_context().get_node_id()  # which cluster node ran (the last attempt of) the trial
    device = "cuda" if trial.gpu > 0 and torch.cuda.is_available() else "cpu"
    torch.set_num_threads(max(1, int(trial.cpu)))
    # The clock (the trial's compute in the report) starts after what is not training, paid once per worker process:
    # torch's compiler stack, which torch imports at the first optimizer construction (1-2 s, hence the import
    # above), reading the data, and on the CPU loading KOALA's fused kernels (about a second, most of it Numba's
    # start-up). Each would dominate a small trial and weigh on whichever optimizer a fresh worker runs first.
    workload = workloads.get(trial.workload, **trial.workload_config)
    workload.prepare()
    if device == "cpu" and trial.optimizer.startswith("koala"):
        cpu_kernels.warm_up()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="koala-trial-") as work:
        clock = _TrialClock.resume(Path(work), started)
        common = {"device": device, "node": node}

        def report(epoch: int, metrics: dict[str, float]) -> None:
            clock.epoch_done(metrics["epoch_seconds"])
            tune.report(
                {**metrics, OBJECTIVE: metrics[trial.metric], "epoch": epoch, **common, **clock.times()},
                checkpoint=tune.Checkpoint.from_directory(work),
            )

        result = train.run(
            workload,
            trial.optimizer,
            trial.hyperparams,
            seed=trial.seed,
            epochs=trial.epochs,
            report=report,
            checkpoint_dir=work,
            device=device,
        )
        if result.diverged:
            tune.report({"diverged": True, "epoch": result.diverged_at, OBJECTIVE: math.nan, **common, **clock.times()})


class _TrialClock:
    """A trial's wall and per-epoch seconds, counting every attempt: saved beside its checkpoint after each epoch and
    restored with it when Tune retries the trial (its node died)."""

    def __init__(self, work: Path, started: float, epoch_seconds: list[float], earlier_seconds: float) -> None:
        self.file = work / TIMING_FILE
        self.started = started  # this attempt's start, by time.perf_counter()
        self.epoch_seconds = epoch_seconds
        self.earlier_seconds = earlier_seconds  # wall time of the attempts before this one

    @classmethod
    def resume(cls, work: Path, started: float) -> _TrialClock:
        """Copy the trial's last checkpoint into `work`, if it has one, and go on counting from its timing."""
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:  # a retried trial: resume from the last epoch
            with checkpoint.as_directory() as saved:
                shutil.copytree(saved, work, dirs_exist_ok=True)
            timing = work / TIMING_FILE
            if timing.exists():
                saved_timing = json.loads(timing.read_text())
                return cls(work, started, saved_timing["epoch_seconds"], saved_timing["wall_seconds"])
        return cls(work, started, [], 0.0)

    def wall(self) -> float:
        return self.earlier_seconds + time.perf_counter() - self.started

    def epoch_done(self, seconds: float) -> None:
        self.epoch_seconds.append(seconds)
        self.file.write_text(json.dumps({"epoch_seconds": self.epoch_seconds, "wall_seconds": self.wall()}))

    def times(self) -> dict[str, Any]:
        return {"wall_seconds": self.wall(), "epoch_seconds": list(self.epoch_seconds)}
