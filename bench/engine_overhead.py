"""Scheduling overhead of the comparison engine per trial, on a warm local Ray cluster.

A job of near-zero-work trials (noisy quadratic, dimension 2, one tiny epoch each) runs twice on the same Ray
instance (the first run warms workers and imports). Overhead per trial = (job wall time - summed trial time /
concurrency) / trials. Also measured: the time from `koala run` start to the first trial starting, in a fresh process,
and on a warm service (`koala serve` with its Ray head running and its standby driver waiting) the time from
submitting examples/digits.yaml to its first trial: started by the driver (created in its study, handed to Ray Tune)
and running on a Ray worker (the API's `started_at`). Each service submission is cancelled once its first trial runs.

    python bench/engine_overhead.py [--trials 24] [--concurrency 2] [--submissions 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import optuna
import ray
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from service.engine import run_job
from service.jobspec import JobSpec
from service.limits import Limits
from service.recorder import Recorder, job_study_names, storage_for
from service.testing import LiveServer

DIGITS_JOB = Path(__file__).resolve().parents[1] / "examples" / "digits.yaml"

FIRST_TRIAL_TIMEOUT = 600  # seconds; a first trial normally starts within a few
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
        deadline = time.monotonic() + FIRST_TRIAL_TIMEOUT
        while process.poll() is None and first is None:
            if time.monotonic() > deadline:
                process.send_signal(signal.SIGINT)  # `koala run` stops its local Ray on the way out
                process.wait(timeout=120)
                raise TimeoutError(f"`koala run` started no trial within {FIRST_TRIAL_TIMEOUT} s")
            time.sleep(0.05)
            names = job_study_names(storage, "first") if Path(database.removeprefix("sqlite:///")).exists() else []
            if names and optuna.load_study(study_name=names[0], storage=storage).trials:
                first = time.perf_counter() - started
        process.wait()
        return first if first is not None else float("nan")


def wait_until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} after {timeout:g} s")
        time.sleep(0.05)


def standby_ready(data_dir: Path) -> bool:
    return any(data_dir.glob("standby/*/*/ready"))


def warm_service_first_trial(submissions: int) -> list[tuple[float, float]]:
    """On a warm `koala serve`, seconds from submitting the digits job to its first trial (started by the driver,
    running on a Ray worker), once per submission."""
    spec = yaml.safe_load(DIGITS_JOB.read_text())
    optimizers = [entry["name"] for entry in spec["optimizers"]]
    figures = []
    with tempfile.TemporaryDirectory(prefix="koala-warm-") as tmp:
        data_dir = Path(tmp)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KOALA_", "RAY_ADDRESS"))}
        env |= {"KOALA_DATA_DIR": str(data_dir), "KOALA_DATABASE_URL": f"sqlite:///{data_dir / 'koala.db'}"}
        server = LiveServer(data_dir, env).start()
        storage = storage_for(env["KOALA_DATABASE_URL"])
        try:
            with httpx.Client(base_url=server.url, timeout=30) as http:
                wait_until(lambda: "local head at" in http.get("/readyz").json()["ray"], 300, "no Ray head")
                for run in range(submissions + 1):  # the first warms what a first job loads (caches, workers)
                    wait_until(lambda: standby_ready(data_dir), 300, "no standby driver")
                    time.sleep(1.0)  # let the standby's start-up settle
                    submitted = datetime.now(UTC)
                    job = http.post("/v1/jobs", json=spec).json()

                    def first_start(job_id: str = job["id"]) -> datetime | None:
                        starts = [
                            t.datetime_start
                            for name in job_study_names(storage, job_id, optimizers)
                            for t in optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
                            if t.datetime_start is not None
                        ]
                        return min(starts).astimezone(UTC) if starts else None

                    def first_running(job_id: str = job["id"]) -> datetime | None:
                        trials = http.get(f"/v1/jobs/{job_id}/trials").json()
                        running = [datetime.fromisoformat(t["started_at"]) for t in trials if t["epochs_done"] > 0]
                        return min(running) if running else None

                    wait_until(lambda: first_start() is not None, 120, "no trial started")
                    wait_until(lambda: first_running() is not None, 300, "no trial ran")
                    started, running = first_start(), first_running()
                    assert started is not None
                    assert running is not None
                    http.post(f"/v1/jobs/{job['id']}/cancel")
                    wait_until(
                        lambda job_id=job["id"]: http.get(f"/v1/jobs/{job_id}").json()["state"] == "cancelled",
                        120,
                        "not cancelled",
                    )
                    if run:
                        figures.append(((started - submitted).total_seconds(), (running - submitted).total_seconds()))
        finally:
            storage.engine.dispose()  # type: ignore[attr-defined]
            server.stop()
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--submissions", type=int, default=3, help="digits jobs submitted to the warm service")
    args = parser.parse_args()
    service = warm_service_first_trial(args.submissions)
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
    started = ", ".join(f"{s:.2f}" for s, _ in service)
    running = ", ".join(f"{r:.2f}" for _, r in service)
    print(
        f"- warm `koala serve` (its Ray head up, a standby driver waiting), submit {DIGITS_JOB.name} to first trial "
        f"started: median {statistics.median(s for s, _ in service):.2f} s ({started}; goal < 1 s); to first trial "
        f"running on a Ray worker: median {statistics.median(r for _, r in service):.2f} s ({running})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
