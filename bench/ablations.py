"""KOALA ablations on the embedded workloads, on the protocol of bench/quality.py.

Every configuration runs on the four embedded workloads (the settings and epochs of bench/quality.py) for 3 seeds,
at fixed hyperparameters: nothing here is tuned per workload. Each finished trial is appended to a JSONL file, so
the table covers every configuration ever tried, failures included.

    python bench/ablations.py run NAME [NAME ...] [--jobs 2] [--seeds 3] [--workloads a,b]
    python bench/ablations.py table [--markdown PATH]      # every configuration in the outcomes file
    python bench/ablations.py list
    python bench/ablations.py heldout [--table]            # the held-out check (other configurations, fixed)

Configurations are named in `CONFIGS`: a registry optimizer and its hyperparameters. `kalman-lab` is
`bench/kalman_lab.py` (KOALA-V's structure with one switch per hypothesis).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kalman_lab import KalmanLab
from quality import GRIDS, SETTINGS, Setting

from koala import diag_cpu_kernels, optimizers, train, workloads

if "kalman-lab" not in optimizers.names():
    optimizers.register(optimizers.OptimizerSpec("kalman-lab", KalmanLab, "ablation filter (bench only)"))

OUTCOMES = Path(__file__).resolve().parent / "ablations.jsonl"
WORKLOADS = list(SETTINGS)

# name -> (optimizer, hyperparameters, hypothesis it tests)
CONFIGS: dict[str, tuple[str, dict[str, Any], str]] = {
    "koala-v": ("koala-v", {}, "faithful KOALA-V (library)"),
    "koala-m": ("koala-m", {}, "faithful KOALA-M (library)"),
    "lab": ("kalman-lab", {}, "lab at its defaults = KOALA-V (sanity check)"),
    # H1: measurement unit
    "H1 per-sequence": ("kalman-lab", {"unit": "leading"}, "H1: per-sequence losses"),
    # H2/H3: target and R
    "H2 R about target (lr=1)": ("kalman-lab", {"noise": "target"}, "H2 alone: eq. 49 with target 0"),
    "H2 R = variance": ("kalman-lab", {"noise": "variance"}, "H2': R = per-sample loss variance"),
    "H3 target momo-lb": ("kalman-lab", {"target": "momo"}, "H3: MoMo lower bound, R = m2"),
    "H3 target momo-lb, R about target": (
        "kalman-lab",
        {"target": "momo", "noise": "target"},
        "H3+H2: MoMo lower bound, R eq. 49",
    ),
    "H3 target 0.5 min-loss, R about target": (
        "kalman-lab",
        {"target": "fraction", "noise": "target"},
        "H3+H2: f* = 0.5 x lowest smoothed loss",
    ),
    # H4: per-parameter scaling
    "H4 adam-diag (tensor-normalised)": ("kalman-lab", {"precondition": "adam"}, "H4: P = s diag(1/sqrt(v))"),
    "H4 adam-diag (global-normalised)": (
        "kalman-lab",
        {"precondition": "adam", "normalise": "global"},
        "H4: P = s diag(1/sqrt(v)), one normalisation",
    ),
    "H4 adam-diag + beta1 0.9": (
        "kalman-lab",
        {"precondition": "adam", "beta1": 0.9},
        "H4: Adam direction m/sqrt(v) under the filter's gain",
    ),
    # H6 (own): one innovation for the whole network instead of one per block
    "H6 global innovation": ("kalman-lab", {"innovation": "global"}, "H6: eq. 12 instead of the layer-wise eq. 27"),
    # Combinations, round 2
    "H4+H2 adam-diag, R = variance": ("kalman-lab", {"precondition": "adam", "noise": "variance"}, "H4+H2'"),
    "H4+H2 adam-diag, R = variance/B": ("kalman-lab", {"precondition": "adam", "noise": "mean-noise"}, "H4+H2''"),
    "H2 R = variance/B": ("kalman-lab", {"noise": "mean-noise"}, "H2'': R = noise of the minibatch mean"),
    "H4+H2+H3 adam-diag, R = variance, f* = 0.5 min": (
        "kalman-lab",
        {"precondition": "adam", "noise": "variance", "target": "fraction"},
        "H4+H2'+H3",
    ),
    "H7 fading 0.9, q=0": ("kalman-lab", {"fading": 0.9, "process_noise": 0.0}, "H7: fading-memory covariance"),
    "H4+H7 adam-diag, fading 0.9, q=0": (
        "kalman-lab",
        {"precondition": "adam", "fading": 0.9, "process_noise": 0.0},
        "H4+H7",
    ),
    "H4+H7+H2 adam-diag, fading 0.9, q=0, R = variance": (
        "kalman-lab",
        {"precondition": "adam", "fading": 0.9, "process_noise": 0.0, "noise": "variance"},
        "H4+H7+H2'",
    ),
    # Round 3: a normalisation of D that entries without gradient cannot dominate
    "H4 adam-diag (tensor-rms)": ("kalman-lab", {"precondition": "adam", "normalise": "tensor-rms"}, "H4"),
    "H4 adam-diag (global-rms)": ("kalman-lab", {"precondition": "adam", "normalise": "global-rms"}, "H4"),
    "H4 adam-diag (unnormalised)": ("kalman-lab", {"precondition": "adam", "normalise": "none"}, "H4"),
    "H4+H2 adam-diag (tensor-rms), R = variance": (
        "kalman-lab",
        {"precondition": "adam", "normalise": "tensor-rms", "noise": "variance"},
        "H4+H2'",
    ),
    "H4+H2 adam-diag (global-rms), R = variance": (
        "kalman-lab",
        {"precondition": "adam", "normalise": "global-rms", "noise": "variance"},
        "H4+H2'",
    ),
    # Round 4: on top of adam-diag (global-rms) + R = variance ("W")
    "W + beta1 0.9": (
        "kalman-lab",
        {"precondition": "adam", "normalise": "global-rms", "noise": "variance", "beta1": 0.9},
        "W + Adam's first moment as the direction",
    ),
    "W + global innovation": (
        "kalman-lab",
        {"precondition": "adam", "normalise": "global-rms", "noise": "variance", "innovation": "global"},
        "W + H6",
    ),
    "W + per-sequence": (
        "kalman-lab",
        {"precondition": "adam", "normalise": "global-rms", "noise": "variance", "unit": "leading"},
        "W + H1",
    ),
    "H4+H2 adam-diag (unnormalised), R = variance": (
        "kalman-lab",
        {"precondition": "adam", "normalise": "none", "noise": "variance"},
        "H4+H2'",
    ),
    # Round 5: W + per-sequence ("W1") with the two mixed refinements
    "W1 + beta1 0.9": (
        "kalman-lab",
        {"precondition": "adam", "normalise": "global-rms", "noise": "variance", "unit": "leading", "beta1": 0.9},
        "W + H1 + first moment",
    ),
    "W1 + global innovation": (
        "kalman-lab",
        {
            "precondition": "adam",
            "normalise": "global-rms",
            "noise": "variance",
            "unit": "leading",
            "innovation": "global",
        },
        "W + H1 + H6",
    ),
    "W1 + beta1 0.9 + global innovation": (
        "kalman-lab",
        {
            "precondition": "adam",
            "normalise": "global-rms",
            "noise": "variance",
            "unit": "leading",
            "beta1": 0.9,
            "innovation": "global",
        },
        "W + H1 + first moment + H6",
    ),
    # Round 6: leave-one-out around "W1 + global innovation"
    "W1 + global innovation, without adam-diag": (
        "kalman-lab",
        {"noise": "variance", "unit": "leading", "innovation": "global"},
        "leave-one-out: no H4",
    ),
    "W1 + global innovation, with R = m2": (
        "kalman-lab",
        {"precondition": "adam", "normalise": "global-rms", "unit": "leading", "innovation": "global"},
        "leave-one-out: official R (D4)",
    ),
    # The shipped class at its defaults (koala/koala_diag.py): "W1 + global innovation" engineered
    "koala-diag": ("koala-diag", {}, "the winner as shipped"),
    # H5: KOALA++
    "H5 koala++ (sigma=q=0.1)": ("koalapp", {}, "H5: KOALA++ at the published CNN config"),
    "H5 koala++ (sigma=q=1)": ("koalapp", {"sigma": 1.0, "q": 1.0}, "H5: KOALA++ at its class defaults"),
}


# A held-out check, fixed before it was run: other configurations of the same four workloads, never used to choose
# anything; the winner at its defaults against KOALA-M, KOALA-V, Prodigy and the 5-point grids of bench/quality.py.
HELDOUT: dict[str, Setting] = {
    "digits-mlp": Setting({"hidden": 32, "batch_size": 64}, epochs=10, target=0.96),
    "digits-cnn": Setting({"hidden": 16, "batch_size": 16}, epochs=10, target=0.97),
    "noisy-quadratic": Setting({"dimension": 300, "condition": 1e6, "batch_size": 128}, epochs=10, target=75.0),
    "char-lm": Setting({"limit_chars": 100_000, "seq_len": 32, "layers": 2, "dropout": 0.1}, epochs=3, target=10.0),
}
HELDOUT_OUTCOMES = Path(__file__).resolve().parent / "ablations-heldout.jsonl"
HELDOUT_CONFIGS: dict[str, tuple[str, dict[str, Any], str]] = {
    "koala-diag": ("koala-diag", {}, "the winner"),
    "koala-m": ("koala-m", {}, "faithful KOALA-M"),
    "koala-v": ("koala-v", {}, "faithful KOALA-V"),
    "prodigy": ("prodigy", {}, "Prodigy at its defaults"),
    **{f"momentum lr={lr:g}": ("momentum", {"lr": lr}, "grid") for lr in GRIDS["momentum"]},
    **{f"adam lr={lr:g}": ("adam", {"lr": lr}, "grid") for lr in GRIDS["adam"]},
}


@dataclasses.dataclass(frozen=True)
class Trial:
    config: str
    workload: str
    seed: int
    heldout: bool = False


def run_trial(trial: Trial) -> dict[str, Any]:
    optimizer, hyperparams, _ = (HELDOUT_CONFIGS if trial.heldout else CONFIGS)[trial.config]
    setting = (HELDOUT if trial.heldout else SETTINGS)[trial.workload]
    started = time.perf_counter()
    try:
        result = train.run(
            trial.workload,
            optimizer,
            hyperparams,
            seed=trial.seed,
            epochs=setting.epochs,
            workload_config=setting.config,
            device="cpu",
        )
        metric = workloads.workload_class(trial.workload).metric
        curve = [e.metrics[metric] for e in result.epochs]
        diverged, error = result.diverged, None
    except Exception as exc:  # a crashing variant is a result too
        curve, diverged, error = [], True, f"{type(exc).__name__}: {exc}"
    return {
        **dataclasses.asdict(trial),
        "optimizer": optimizer,
        "hyperparams": hyperparams,
        "curve": curve,
        "diverged": diverged,
        "error": error,
        "seconds": time.perf_counter() - started,
    }


def _init_worker() -> None:
    torch.set_num_threads(1)
    diag_cpu_kernels.warm_up()  # also koala.cpu_kernels'; outside every trial's time


def run(names: list[str], seeds: int, jobs: int, names_of_workloads: list[str], heldout: bool = False) -> None:
    trials = [Trial(n, w, s, heldout) for n in names for w in names_of_workloads for s in range(seeds)]
    path = HELDOUT_OUTCOMES if heldout else OUTCOMES
    with ProcessPoolExecutor(max_workers=jobs, initializer=_init_worker) as pool, path.open("a") as log:
        futures = [pool.submit(run_trial, t) for t in trials]
        for done, future in enumerate(as_completed(futures), start=1):
            outcome = future.result()
            outcome["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            log.write(json.dumps(outcome) + "\n")
            log.flush()
            final = f"{outcome['curve'][-1]:.4g}" if outcome["curve"] else outcome["error"] or "-"
            print(
                f"[{done}/{len(trials)}] {outcome['config']} {outcome['workload']} seed {outcome['seed']}: {final}"
                f"{' (diverged)' if outcome['diverged'] else ''} ({outcome['seconds']:.0f} s)",
                file=sys.stderr,
                flush=True,
            )


def load(path: Path = OUTCOMES) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def cell(outcomes: list[dict[str, Any]], workload: str) -> tuple[float, float, int, int]:
    """(mean, std, seeds, diverged) of the final metric; a diverged seed makes the mean the worst value."""
    maximise = workloads.workload_class(workload).mode == "max"
    worst = -math.inf if maximise else math.inf
    finals = [o["curve"][-1] if o["curve"] and not o["diverged"] else worst for o in outcomes]
    diverged = sum(o["diverged"] for o in outcomes)
    if not finals:
        return math.nan, math.nan, 0, 0
    if not all(math.isfinite(v) for v in finals):
        return worst, math.nan, len(finals), diverged
    return statistics.mean(finals), statistics.stdev(finals) if len(finals) > 1 else 0.0, len(finals), diverged


def table(path: Path = OUTCOMES) -> str:
    outcomes = load(path)
    order: list[str] = []
    for o in outcomes:
        if o["config"] not in order:
            order.append(o["config"])
    header = "| configuration | optimizer and settings | " + " | ".join(WORKLOADS) + " |"
    lines = [header, "| --- | --- |" + " ---: |" * len(WORKLOADS)]
    for name in order:
        first = next(o for o in outcomes if o["config"] == name)
        settings = " ".join(f"{k}={v}" for k, v in first["hyperparams"].items())
        cells = [f"{first['optimizer']} {settings}".strip()]
        for w in WORKLOADS:
            members = [o for o in outcomes if o["config"] == name and o["workload"] == w]
            mean, std, n, diverged = cell(members, w)
            if n == 0:
                cells.append("-")
                continue
            digits = 4 if workloads.workload_class(w).mode == "max" else 3
            text = f"{mean:.{digits}g} ± {std:.2g}" if math.isfinite(mean) else "diverged"
            if n != 3:
                text += f" ({n} seeds)"
            if diverged and math.isfinite(mean):
                text += f" ({diverged} diverged)"
            cells.append(text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def heldout_table() -> str:
    """The held-out runs: every configuration, then per workload the grid-best baselines and the verdict."""
    outcomes = load(HELDOUT_OUTCOMES)
    lines = [table(HELDOUT_OUTCOMES), ""]
    for w in WORKLOADS:
        maximise = workloads.workload_class(w).mode == "max"
        cells = {
            name: cell([o for o in outcomes if o["config"] == name and o["workload"] == w], w)
            for name in HELDOUT_CONFIGS
        }
        if any(c[2] == 0 for c in cells.values()):
            continue
        sign = 1 if maximise else -1

        def key(name: str, cells: dict[str, tuple[float, float, int, int]] = cells, sign: int = sign) -> float:
            return sign * cells[name][0]

        best = {grid: max((n for n in cells if n.startswith(grid + " ")), key=key) for grid in GRIDS}
        top = max(best.values(), key=key)
        mean, std = cells[top][0], cells[top][1]
        diag = cells["koala-diag"][0]
        koala_m = cells["koala-m"]
        within = (diag >= mean - std) if maximise else (diag <= mean + std)
        not_worse = (diag >= koala_m[0] - koala_m[1]) if maximise else (diag <= koala_m[0] + koala_m[1])
        lines.append(
            f"- {w} ({HELDOUT[w].config}): grid-best {', '.join(f'{g} {n.split()[-1]}' for g, n in best.items())}; "
            f"best {top} {mean:.4g} ± {std:.2g}; koala-diag {diag:.4g}: "
            f"{'within one std or better' if within else 'outside one std'}; "
            f"{'not worse than' if not_worse else 'worse than'} KOALA-M ({koala_m[0]:.4g} ± {koala_m[1]:.2g}) "
            "by more than one std"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run")
    run_parser.add_argument("names", nargs="+")
    run_parser.add_argument("--seeds", type=int, default=3)
    run_parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    run_parser.add_argument("--workloads", default=",".join(WORKLOADS))
    table_parser = sub.add_parser("table")
    table_parser.add_argument("--markdown")
    sub.add_parser("list")
    heldout_parser = sub.add_parser("heldout", help="run (or with --table only summarise) the held-out check")
    heldout_parser.add_argument("--table", action="store_true")
    heldout_parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    heldout_parser.add_argument("--workloads", default=",".join(WORKLOADS))
    args = parser.parse_args(argv)
    if args.command == "heldout":
        if not args.table:
            run(list(HELDOUT_CONFIGS), 3, args.jobs, args.workloads.split(","), heldout=True)
        print(heldout_table())
        return 0
    if args.command == "list":
        for name, (optimizer, hyperparams, note) in CONFIGS.items():
            print(f"{name}: {optimizer} {hyperparams} -- {note}")
        return 0
    if args.command == "table":
        text = table()
        print(text)
        if args.markdown:
            Path(args.markdown).write_text(text + "\n")
        return 0
    unknown = [n for n in args.names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configurations: {unknown}")
    run(args.names, args.seeds, args.jobs, args.workloads.split(","))
    return 0


if __name__ == "__main__":
    sys.exit(main())
