"""Throughput and overhead of the service on a two-node Ray cluster with PostgreSQL, all on this host.

The topology of docker/compose.yaml without Docker (service/testing.py): a fresh PostgreSQL database, a Ray head and
a second Ray node on 127.0.0.1 (1 CPU each, `ray start` processes), and `koala serve` whose job driver joins that
cluster through RAY_ADDRESS. One job of `--trials` near-zero-work trials (noisy quadratic, dimension 2, one tiny
epoch, one CPU each, 2 at once) runs through the HTTP API while `--pollers` clients each GET /v1/jobs/{id} every
`--poll-interval` seconds. Reported:

- trials per minute: trials / job wall time (from the driver's start to the job's end, as the job records them);
- scheduling overhead per trial: (job wall time - summed trial time / concurrency) / trials;
- latency of GET /v1/jobs/{id} while the job runs: p50, p95, p99, max.

With `--baseline` (default on), the same job then runs on the stock setup (SQLite, a local Ray of 2 CPUs that the
driver starts), for the ratios. Each finished configuration is appended to `--out` as one JSON line.

    python bench/cluster.py [--trials 100] [--pollers 4] [--poll-interval 0.1] [--no-baseline] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from service.testing import LiveServer, LoopbackCluster, kill_drivers, temporary_database

CONCURRENCY = 2
JOB_TIMEOUT = 3600  # seconds, far above any --trials this bench is run with


def job_spec(trials: int) -> dict[str, Any]:
    # One fixed optimizer on `trials` seeds: independent trials, no tuning dependencies between them.
    return {
        "name": f"cluster benchmark, {trials} trials",
        "workload": "noisy-quadratic",
        "workload_config": {"dimension": 2, "samples_per_epoch": 32},
        "epochs": 1,
        "seeds": trials,
        "max_concurrent_trials": CONCURRENCY,
        "resources": {"cpu": 1},
        "optimizers": [{"name": "sgd", "params": {"lr": 0.1}}],
    }


class Poller:
    """`clients` threads, each timing GET /v1/jobs/{id} every `interval` seconds until stopped."""

    def __init__(self, url: str, job_id: str, clients: int, interval: float) -> None:
        self.url, self.job_id, self.interval = url, job_id, interval
        self.latencies: list[float] = []
        self.errors = 0
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self.stop.is_set():
                started = time.perf_counter()
                try:
                    ok = client.get(f"/v1/jobs/{self.job_id}").status_code == 200
                except httpx.HTTPError:
                    ok = False
                elapsed = time.perf_counter() - started
                with self.lock:
                    if ok:
                        self.latencies.append(elapsed)
                    else:
                        self.errors += 1
                self.stop.wait(self.interval)

    def __enter__(self) -> Poller:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def run_job(server: LiveServer, trials: int, pollers: int, interval: float) -> dict[str, Any]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        submitted = time.perf_counter()
        job = client.post("/v1/jobs", json=job_spec(trials)).json()
        deadline = time.monotonic() + JOB_TIMEOUT
        with Poller(server.url, job["id"], pollers, interval) as poller:
            while (state := client.get(f"/v1/jobs/{job['id']}").json())["state"] not in {
                "succeeded",
                "failed",
                "cancelled",
            }:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"job {job['id']} still {state['state']} after {JOB_TIMEOUT} s")
                time.sleep(0.5)
        end_to_end = time.perf_counter() - submitted
        if state["state"] != "succeeded":
            raise RuntimeError(f"job {job['id']} {state['state']}: {state.get('error')}")
        found = client.get(f"/v1/jobs/{job['id']}/trials").json()
    wall = (datetime.fromisoformat(state["finished_at"]) - datetime.fromisoformat(state["started_at"])).total_seconds()
    summed = sum(t["wall_seconds"] for t in found)
    latencies = poller.latencies
    return {
        "trials": len(found),
        "complete": sum(t["state"] == "complete" for t in found),
        "nodes": dict(Counter(t["node"] for t in found)),
        "job_wall_seconds": wall,
        "submit_to_done_seconds": end_to_end,
        "summed_trial_seconds": summed,
        "trials_per_minute": len(found) / wall * 60,
        "overhead_per_trial_seconds": (wall - summed / CONCURRENCY) / len(found),
        "polls": len(latencies),
        "poll_errors": poller.errors,
        "get_job_ms": {
            "p50": percentile(latencies, 50) * 1000,
            "p95": percentile(latencies, 95) * 1000,
            "p99": percentile(latencies, 99) * 1000,
            "max": max(latencies) * 1000,
            "mean": statistics.mean(latencies) * 1000,
        },
    }


def server_env(data_dir: Path, database_url: str, trials: int, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KOALA_", "RAY_"))}
    env.update(
        {
            "KOALA_DATA_DIR": str(data_dir),
            "KOALA_DATABASE_URL": database_url,
            "KOALA_SCHEDULER_SECONDS": "0.5",
            "KOALA_LIMITS__MAX_SEEDS": str(trials),
            **extra,
        }
    )
    return env


def measure(name: str, data_dir: Path, database_url: str, extra_env: dict[str, str], args: Any) -> dict[str, Any]:
    data_dir.mkdir(parents=True)
    server = LiveServer(data_dir, server_env(data_dir, database_url, args.trials, extra_env)).start()
    try:
        result = {"setup": name, **run_job(server, args.trials, args.pollers, args.poll_interval)}
    finally:
        server.stop()
        kill_drivers(database_url)
    print(json.dumps(result), flush=True)
    if args.out:
        with open(args.out, "a") as out:
            out.write(json.dumps({**result, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}) + "\n")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--pollers", type=int, default=4)
    parser.add_argument("--poll-interval", type=float, default=0.1)
    parser.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", type=Path, help="append each configuration's result as a JSON line")
    args = parser.parse_args()

    import optuna
    import ray

    results = []
    with tempfile.TemporaryDirectory(prefix="koala-bench-") as tmp, contextlib.ExitStack() as stack:
        database = stack.enter_context(temporary_database())
        cluster = stack.enter_context(LoopbackCluster())
        cluster.add_node("a", num_cpus=1)
        cluster.add_node("b", num_cpus=1)
        results.append(measure("two-node Ray + PostgreSQL", Path(tmp) / "cluster", database, cluster.env, args))
        stack.close()
        if args.baseline:
            sqlite = f"sqlite:///{tmp}/baseline/koala.db"
            results.append(measure("local Ray (2 CPUs) + SQLite", Path(tmp) / "baseline", sqlite, {}, args))

    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(
        f"\nMachine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"ray {ray.__version__}, optuna {optuna.__version__}; {date}"
    )
    print("| setup | trials/min | overhead/trial s | job wall s | summed trial s | GET job p50 / p95 / p99 / max ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        ms = r["get_job_ms"]
        print(
            f"| {r['setup']} | {r['trials_per_minute']:.1f} | {r['overhead_per_trial_seconds']:.2f} | "
            f"{r['job_wall_seconds']:.1f} | {r['summed_trial_seconds']:.1f} | "
            f"{ms['p50']:.1f} / {ms['p95']:.1f} / {ms['p99']:.1f} / {ms['max']:.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
