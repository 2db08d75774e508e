"""The comparison report, computed only from a job's Optuna studies (so it can be rebuilt at any time).

Per optimizer: mode, the hyperparameters used (the best found, for tuned ones), trial counts by state, the final
metric over seeds (mean, std, min, max) of the evaluation trials, the per-epoch curve (mean and std over seeds),
epochs and seconds to the target, and the compute spent (trial-seconds, tuning included). Across optimizers: the
ranking and the HPO cost ratio: for each tuned baseline, the tuning compute it spent until one of its trials first
matched the best untuned KOALA result, divided by the compute of one KOALA run. And the trials that failed, with why.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import optuna
from optuna.trial import FrozenTrial, TrialState

from koala_client.models import CurvePoint, FailedTrial, HpoCost, OptimizerReport, Report, TargetReach
from service.recorder import job_study_names

__all__ = ["Report", "build_report"]


def build_report(storage: optuna.storages.BaseStorage, job_id: str, optimizers: Iterable[str] | None = None) -> Report:
    """Read every study of `job_id` (those of its JobSpec's `optimizers`, looked up by name, when given; see
    job_study_names) and compute the report."""
    names = job_study_names(storage, job_id, optimizers)
    studies = [optuna.load_study(study_name=name, storage=storage) for name in names]
    if not studies:
        raise LookupError(f"no studies for job {job_id}")
    attrs = studies[0].user_attrs
    direction: Literal["maximize", "minimize"] = attrs["direction"]
    target = attrs.get("target")
    reports = []
    trials_by_optimizer: dict[str, list[FrozenTrial]] = {}
    for study in studies:
        trials = study.get_trials(deepcopy=False)
        trials_by_optimizer[study.user_attrs["optimizer"]] = trials
        reports.append(_optimizer_report(study, trials, direction, target))
    maximise = direction == "maximize"
    finished = [(r.final_mean, r.optimizer) for r in reports if r.final_mean is not None]
    ranked = [name for _, name in sorted(finished, key=lambda pair: -pair[0] if maximise else pair[0])]
    return Report(
        job_id=job_id,
        metric=attrs["metric"],
        direction=direction,
        target=target,
        optimizers=reports,
        ranking=ranked,
        hpo_cost=_hpo_costs(reports, trials_by_optimizer, maximise),
        failed_trials=_failed(trials_by_optimizer),
    )


def _failed(trials: dict[str, list[FrozenTrial]]) -> list[FailedTrial]:
    """Every planned trial that ended FAIL (a trial without a phase was never started; see Recorder.close_orphans)."""
    return [
        FailedTrial(
            optimizer=optimizer,
            phase=t.user_attrs["phase"],
            seed=int(t.user_attrs.get("seed", 0)),
            number=t.number,
            reason=str(t.user_attrs.get("reason") or "unknown"),
        )
        for optimizer, studied in trials.items()
        for t in studied
        if t.state == TrialState.FAIL and "phase" in t.user_attrs
    ]


def _optimizer_report(
    study: optuna.Study, trials: Sequence[FrozenTrial], direction: str, target: float | None
) -> OptimizerReport:
    attrs = study.user_attrs
    maximise = direction == "maximize"
    evaluation = [t for t in trials if t.user_attrs.get("phase") == "eval"]
    completed = [t for t in evaluation if t.state == TrialState.COMPLETE and t.value is not None]
    finals = [float(t.value) for t in completed]  # type: ignore[arg-type]
    counts: dict[str, int] = {}
    for t in trials:
        if "phase" in t.user_attrs:  # a trial without one was never started (see Recorder.close_orphans)
            counts[t.state.name] = counts.get(t.state.name, 0) + 1
    if attrs["mode"] == "tuned":
        hyperparams = completed[0].user_attrs["hyperparams"] if completed else _best_tuned_params(trials, maximise)
    else:
        hyperparams = dict(attrs.get("params", {}))
    return OptimizerReport(
        optimizer=attrs["optimizer"],
        mode=attrs["mode"],
        hyperparams=hyperparams,
        trials=counts,
        final_mean=statistics.mean(finals) if finals else None,
        final_std=statistics.stdev(finals) if len(finals) > 1 else (0.0 if finals else None),
        final_min=min(finals) if finals else None,
        final_max=max(finals) if finals else None,
        seeds=len(finals),
        curve=_curve(completed),
        target=_target(completed, target, maximise) if target is not None else None,
        compute_seconds=sum(_seconds(t) for t in trials),
        tuning_seconds=sum(_seconds(t) for t in trials if t.user_attrs.get("phase") == "tune"),
    )


def _seconds(trial: FrozenTrial) -> float:
    return float(trial.user_attrs.get("wall_seconds", 0.0))


def _best_tuned_params(trials: Sequence[FrozenTrial], maximise: bool) -> dict[str, Any]:
    tuned = [t for t in trials if t.user_attrs.get("phase") == "tune" and t.state == TrialState.COMPLETE]
    if not tuned:
        return {}
    best = (max if maximise else min)(tuned, key=lambda t: t.value)  # type: ignore[arg-type, return-value]
    return dict(best.user_attrs["hyperparams"])


def _curve(trials: Sequence[FrozenTrial]) -> list[CurvePoint]:
    epochs = sorted({step for t in trials for step in t.intermediate_values})
    points = []
    for epoch in epochs:
        values = [t.intermediate_values[epoch] for t in trials if epoch in t.intermediate_values]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        points.append(CurvePoint(epoch=epoch, mean=statistics.mean(values), std=std, n=len(values)))
    return points


def _reaches(value: float, target: float, maximise: bool) -> bool:
    return value >= target if maximise else value <= target


def _target(trials: Sequence[FrozenTrial], target: float, maximise: bool) -> TargetReach:
    epochs, seconds = [], []
    for t in trials:
        hits = [e for e in sorted(t.intermediate_values) if _reaches(t.intermediate_values[e], target, maximise)]
        if hits:
            epochs.append(hits[0])
            per_epoch = t.user_attrs.get("epoch_seconds", [])
            seconds.append(sum(per_epoch[: hits[0]]))
    return TargetReach(
        reached=len(epochs),
        of=len(trials),
        epochs_mean=statistics.mean(epochs) if epochs else None,
        seconds_mean=statistics.mean(seconds) if seconds else None,
    )


def _hpo_costs(
    reports: Sequence[OptimizerReport], trials: dict[str, list[FrozenTrial]], maximise: bool
) -> list[HpoCost]:
    koala = [r for r in reports if r.mode == "fixed" and r.optimizer.startswith("koala") and r.final_mean is not None]
    if not koala:
        return []
    best = (max if maximise else min)(koala, key=lambda r: r.final_mean)  # type: ignore[arg-type, return-value]
    assert best.final_mean is not None
    koala_runs = [_seconds(t) for t in trials[best.optimizer] if t.user_attrs.get("phase") == "eval"]
    per_run = statistics.mean(koala_runs) if koala_runs else math.nan
    costs = []
    for report in reports:
        if report.mode != "tuned":
            continue
        tuning = sorted(
            (t for t in trials[report.optimizer] if t.user_attrs.get("phase") == "tune" and t.datetime_complete),
            key=lambda t: t.datetime_complete,  # type: ignore[arg-type, return-value]
        )
        spent, matched_at = 0.0, None
        for count, t in enumerate(tuning, start=1):
            spent += _seconds(t)
            value = t.value if t.state == TrialState.COMPLETE else None
            if value is not None and _reaches(value, best.final_mean, maximise):
                matched_at = count
                break
        matched = matched_at is not None
        costs.append(
            HpoCost(
                optimizer=report.optimizer,
                koala_optimizer=best.optimizer,
                koala_result=best.final_mean,
                matched=matched,
                tuning_seconds_to_match=spent if matched else None,
                tuning_trials_to_match=matched_at,
                koala_seconds_per_run=per_run,
                ratio=spent / per_run if matched and per_run > 0 else None,
                ratio_lower_bound=None if matched or not per_run > 0 else spent / per_run,
            )
        )
    return costs
