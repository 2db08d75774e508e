"""Optimizer quality on the embedded workloads: KOALA at its defaults against default and grid-tuned baselines.

For each embedded workload and 3 seeds: KoalaV and KoalaM at their defaults; SGD-momentum and Adam at their usual
defaults and at the best point of a 5-point learning-rate grid (best = best mean final metric over the seeds, so the
grid sees the validation metric: an upper bound for the tuned baselines); Prodigy and Schedule-Free AdamW at their
defaults. Reports the final metric (mean and std over seeds), epochs to a stated target, and compute (trial-seconds;
for grid-tuned rows also the whole grid's). Every trial runs through `koala.train.run`, one CPU thread each, in
parallel worker processes.

    python bench/quality.py [--workloads a,b] [--seeds 3] [--jobs 2] [--json PATH] [--markdown PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch

from koala import cpu_kernels, optimizers, train, workloads


@dataclasses.dataclass(frozen=True)
class Setting:
    """How one workload is benchmarked."""

    config: dict[str, Any]
    epochs: int
    target: float  # for epochs-to-target, in the workload's metric and direction


SETTINGS: dict[str, Setting] = {
    "digits-mlp": Setting({}, epochs=10, target=0.96),
    "digits-cnn": Setting({}, epochs=10, target=0.97),
    "noisy-quadratic": Setting({}, epochs=10, target=250.0),  # half the initial excess risk (500)
    # 100k characters of standard-library source keep a trial to about 15 s on one CPU thread.
    "char-lm": Setting({"limit_chars": 100_000}, epochs=3, target=10.0),
}
GRIDS: dict[str, list[float]] = {
    "momentum": [0.003, 0.01, 0.03, 0.1, 0.3],
    "adam": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2],
}
DEFAULTS = ["koala-v", "koala-m", "momentum", "adam", "prodigy", "schedule-free-adamw"]


@dataclasses.dataclass(frozen=True)
class Trial:
    workload: str
    optimizer: str
    hyperparams: tuple[tuple[str, float], ...]
    seed: int


@dataclasses.dataclass
class Outcome:
    trial: Trial
    curve: list[float]  # metric after each epoch
    seconds: float  # training + evaluation time
    diverged: bool


def run_trial(trial: Trial) -> Outcome:
    setting = SETTINGS[trial.workload]
    started = time.perf_counter()
    result = train.run(
        trial.workload,
        trial.optimizer,
        dict(trial.hyperparams),
        seed=trial.seed,
        epochs=setting.epochs,
        workload_config=setting.config,
        device="cpu",
    )
    metric = workloads.workload_class(trial.workload).metric
    curve = [e.metrics[metric] for e in result.epochs]
    return Outcome(trial, curve, time.perf_counter() - started, result.diverged)


def _init_worker() -> None:
    torch.set_num_threads(1)  # one trial per core: tiny models scale badly across threads
    cpu_kernels.warm_up()  # KOALA's kernels load once per worker, outside every trial's time


def plan(names: Sequence[str], seeds: int) -> list[Trial]:
    trials = []
    for name in names:
        for seed in range(seeds):
            for optimizer in DEFAULTS:
                trials.append(Trial(name, optimizer, (), seed))
            for optimizer, grid in GRIDS.items():
                default_lr = optimizers.get(optimizer).hyperparameters()["lr"]
                trials += [Trial(name, optimizer, (("lr", lr),), seed) for lr in grid if lr != default_lr]
    return trials


@dataclasses.dataclass
class Row:
    label: str
    mean: float
    std: float
    epochs_to_target: str
    seconds: float  # compute of this row's trials (all seeds)
    tuning_seconds: float | None = None  # whole grid, grid-tuned rows only
    diverged: int = 0


def _final(outcome: Outcome, worst: float) -> float:
    return outcome.curve[-1] if outcome.curve and not outcome.diverged else worst


def _epochs_to_target(outcomes: list[Outcome], target: float, maximise: bool) -> str:
    reached = []
    for o in outcomes:
        hits = [i + 1 for i, v in enumerate(o.curve) if (v >= target if maximise else v <= target)]
        if hits:
            reached.append(hits[0])
    if not reached:
        return "not reached"
    mean = statistics.mean(reached)
    return f"{mean:.1f}" + ("" if len(reached) == len(outcomes) else f" ({len(reached)}/{len(outcomes)} seeds)")


def summarise(name: str, outcomes: list[Outcome]) -> tuple[list[Row], dict[str, Any]]:
    setting = SETTINGS[name]
    maximise = workloads.workload_class(name).mode == "max"
    worst = -math.inf if maximise else math.inf
    groups: dict[tuple[str, tuple[tuple[str, float], ...]], list[Outcome]] = {}
    for o in outcomes:
        groups.setdefault((o.trial.optimizer, o.trial.hyperparams), []).append(o)

    def row(label: str, members: list[Outcome]) -> Row:
        # A diverged seed makes the whole row rank last (mean = the worst value), with the count shown.
        finals = [_final(o, worst) for o in members]
        finite = all(math.isfinite(f) for f in finals)
        return Row(
            label,
            statistics.mean(finals) if finite else worst,
            statistics.stdev(finals) if finite and len(finals) > 1 else 0.0,
            _epochs_to_target(members, setting.target, maximise),
            sum(o.seconds for o in members),
            diverged=sum(o.diverged for o in members),
        )

    rows = [row(f"{opt} (defaults)", groups[(opt, ())]) for opt in DEFAULTS]
    best_tuned: dict[str, Row] = {}
    for optimizer in GRIDS:
        default_lr = optimizers.get(optimizer).hyperparameters()["lr"]
        candidates = {(("lr", lr),) if lr != default_lr else (): lr for lr in GRIDS[optimizer]}
        scored = [(row(f"{optimizer} lr={lr:g}", groups[(optimizer, key)]), key) for key, lr in candidates.items()]
        best, _ = max(scored, key=lambda item: item[0].mean if maximise else -item[0].mean)
        best.label = f"{optimizer} grid-best ({best.label.split()[-1]})"
        best.tuning_seconds = sum(r.seconds for r, _ in scored)
        best_tuned[optimizer] = best
        rows.append(best)

    koala_rows = rows[:2]
    best_baseline = max(best_tuned.values(), key=lambda r: r.mean if maximise else -r.mean)
    others_default = rows[2:6]

    def better(a: float, b: float) -> bool:
        return a > b if maximise else a < b

    verdict = {
        "within_one_std_of_best_tuned": [
            r.label
            for r in koala_rows
            if better(r.mean, best_baseline.mean) or abs(r.mean - best_baseline.mean) <= best_baseline.std
        ],
        "ahead_of_every_default": [r.label for r in koala_rows if all(better(r.mean, o.mean) for o in others_default)],
        "best_tuned": best_baseline.label,
    }
    return rows, verdict


def markdown(name: str, rows: list[Row], verdict: dict[str, Any]) -> str:
    setting = SETTINGS[name]
    cls = workloads.workload_class(name)
    direction = "higher" if cls.mode == "max" else "lower"
    lines = [
        f"**{name}** ({cls.description}); {setting.epochs} epochs, config {setting.config or 'default'}; "
        f"metric {cls.metric} ({direction} is better), target {setting.target:g}",
        "",
        f"| optimizer | final {cls.metric} mean | std | epochs to target | compute s (3 seeds) | tuning compute s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        tuning = f"{r.tuning_seconds:.0f}" if r.tuning_seconds is not None else "-"
        flag = f" ({r.diverged} diverged)" if r.diverged else ""
        lines.append(
            f"| {r.label}{flag} | {r.mean:.4g} | {r.std:.2g} | {r.epochs_to_target} | {r.seconds:.0f} | {tuning} |"
        )
    lines += [
        "",
        f"Best grid-tuned baseline: {verdict['best_tuned']}. KOALA within one std of it (or better): "
        f"{', '.join(verdict['within_one_std_of_best_tuned']) or 'none'}. "
        "KOALA ahead of every other optimizer at its defaults: "
        f"{', '.join(verdict['ahead_of_every_default']) or 'none'}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default=",".join(SETTINGS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    parser.add_argument("--outcomes", default="quality-outcomes.jsonl", help="every finished trial, appended")
    parser.add_argument("--summarise", metavar="JSONL", help="only rebuild the tables from a saved outcomes file")
    args = parser.parse_args(argv)
    names = args.workloads.split(",")
    unknown = sorted(set(names) - set(SETTINGS))
    if unknown:
        parser.error(f"--workloads: unknown {', '.join(unknown)}; valid: {', '.join(SETTINGS)}")
    missing = sorted({"prodigy", "schedule-free-adamw"} - set(optimizers.names()))
    if missing:
        parser.error(f"optimizers {', '.join(missing)} are not installed: pip install '.[anchors]'")

    if args.summarise:
        lines = Path(args.summarise).read_text().splitlines()
        outcomes = [_load_outcome(line) for line in lines if line.strip()]
        names = [n for n in names if any(o.trial.workload == n for o in outcomes)]
        trials, wall = [o.trial for o in outcomes], math.nan
    else:
        trials = plan(names, args.seeds)
        started = time.perf_counter()
        outcomes = _run(trials, args.jobs, args.outcomes)
        wall = time.perf_counter() - started
    return _write(names, outcomes, trials, wall, args)


def _load_outcome(line: str) -> Outcome:
    data = json.loads(line)
    trial = data.pop("trial")
    trial["hyperparams"] = tuple(tuple(pair) for pair in trial["hyperparams"])
    return Outcome(Trial(**trial), **data)


def _run(trials: list[Trial], jobs: int, outcomes_path: str) -> list[Outcome]:
    outcomes = []
    with ProcessPoolExecutor(max_workers=jobs, initializer=_init_worker) as pool, open(outcomes_path, "a") as log:
        futures = [pool.submit(run_trial, trial) for trial in trials]
        for done, future in enumerate(as_completed(futures), start=1):
            outcome = future.result()
            outcomes.append(outcome)
            log.write(json.dumps(dataclasses.asdict(outcome)) + "\n")
            log.flush()
            t = outcome.trial
            final = f"{outcome.curve[-1]:.4g}" if outcome.curve else "-"
            print(
                f"[{done}/{len(trials)}] {t.workload} {t.optimizer} {dict(t.hyperparams) or 'defaults'} seed {t.seed}: "
                f"{final} ({outcome.seconds:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    return outcomes


def _write(names: list[str], outcomes: list[Outcome], trials: list[Trial], wall: float, args: Any) -> int:
    header = (
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; Python "
        f"{platform.python_version()}, torch {torch.__version__}; {len(trials)} trials in {args.jobs} worker "
        f"processes of one thread each, {wall / 60:.1f} min wall; "
        f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}."
    )
    sections, report = [header, ""], {}
    for name in names:
        rows, verdict = summarise(name, [o for o in outcomes if o.trial.workload == name])
        sections.append(markdown(name, rows, verdict))
        report[name] = {"rows": [dataclasses.asdict(r) for r in rows], "verdict": verdict}
    text = "\n".join(sections)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"report": report, "trials": [dataclasses.asdict(o) for o in outcomes]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
