"""Scheduling overhead of the comparison engine per trial, on a warm local Ray cluster.

A job of near-zero-work trials (noisy quadratic, dimension 2, one tiny epoch each) runs twice on the same Ray
instance (the first run warms workers and imports). Overhead per trial = (job wall time - summed trial time /
concurrency) / trials. Also measured: the time from `koala run` start to the first trial starting, in a fresh process.

    python bench/engine_overhead.py [--trials 24] [--concurrency 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import ray
import yaml

from service.engine import run_job
from service.jobspec import JobSpec, Limits
from service.recorder import Recorder, job_study_names, storage_for

TINY_WORKLOAD = {"workload": "noisy-quadratic", "workload_config": {"dimension": 2, "samples_per_epoch": 32}}


def job(trials: int, concurrency: int) -> JobSpec:
    # One fixed optimizer per seed: `trials` independent trials with no tuning dependencies between them.
    return JobSpec.parse(
        {
            **TINY_WORKLOAD,
            "epochs": 1,
            "seeds": trials,
            "max_concurrent_trials": concurrency,
            "optimizers": [{"name": "sgd", "params": {"lr": 0.1}}],
        },
        Limits(max_seeds=max(trials, Limits().max_seeds)),  # many seeds: the cheapest way to many trials
    )


def overhead(trials: int, concurrency: int, database: str, job_id: str) -> dict[str, float]:
    spec = job(trials, concurrency)
    storage = storage_for(database)
    started = time.perf_counter()
    outcome = run_job(spec, Recorder(storage, job_id, spec))
    wall = time.perf_counter() - started
    assert outcome.state == "succeeded", outcome.error
    (name,) = job_study_names(storage, job_id)
    summed = sum(t.user_attrs["wall_seconds"] for t in optuna.load_study(study_name=name, storage=storage).trials)
    return {"wall": wall, "summed_trial_seconds": summed, "per_trial": (wall - summed / concurrency) / trials}


def time_to_first_trial(database: str) -> float:
    """Seconds from launching `koala run` to its first trial starting (a fresh process and a fresh local Ray)."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_file = Path(tmp) / "job.yaml"
        spec_file.write_text(
            yaml.safe_dump({**TINY_WORKLOAD, "epochs": 1, "seeds": 1, "optimizers": [{"name": "sgd"}]})
        )
        env = dict(os.environ, KOALA_DATA_DIR=tmp)
        env.pop("RAY_ADDRESS", None)
        command = [
            sys.executable,
            "-m",
            "koala_client.cli",
            "run",
            str(spec_file),
            "--db",
            database,
            "--job-id",
            "first",
        ]
        started = time.perf_counter()
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        storage = storage_for(database)
        first = None
        while process.poll() is None and first is None:
            time.sleep(0.05)
            names = job_study_names(storage, "first") if Path(database.removeprefix("sqlite:///")).exists() else []
            if names and optuna.load_study(study_name=names[0], storage=storage).trials:
                first = time.perf_counter() - started
        process.wait()
        return first if first is not None else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        database = f"sqlite:///{tmp}/bench.db"
        ray.init(num_cpus=args.concurrency, include_dashboard=False, log_to_driver=False)
        try:
            overhead(args.trials, args.concurrency, database, "warmup")
            measured = overhead(args.trials, args.concurrency, database, "measured")
        finally:
            ray.shutdown()
        first = time_to_first_trial(f"sqlite:///{tmp}/first.db")
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(
        f"Engine overhead: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"ray {ray.__version__}, optuna {optuna.__version__}; {date}"
    )
    print(
        f"- {args.trials} trials, concurrency {args.concurrency}, warm local Ray, SQLite: job wall "
        f"{measured['wall']:.1f} s, summed trial time {measured['summed_trial_seconds']:.1f} s"
    )
    print(f"- scheduling overhead per trial: {measured['per_trial']:.2f} s (goal < 0.5 s)")
    print(f"- `koala run` start to first trial started (fresh process, fresh local Ray): {first:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
