"""Latency of the HTTP API under load: 50 concurrent clients for 20 s on loopback against a real `koala serve`.

The load comes from `hey` (Debian/Ubuntu: `apt-get install hey`), one process per client, recording every
response. Three phases: GET /v1/jobs/{id}, GET /v1/jobs (a page of 20 out of `--jobs` stored jobs) and POST
/v1/jobs (a valid spec; the jobs are cancelled right away, outside the timing). `--rate` is each client's requests
per second (a polling client; 0 = back to back, which measures saturation instead: in a closed loop latency is
concurrency / throughput). The server runs without its scheduler, so the figures are the API's alone; the hey
processes share the machine's cores with it.

    python bench/service_load.py [--clients 50] [--seconds 20] [--rate 10] [--jobs 200] [--workers 1]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.conftest import LiveServer

SPEC = {
    "name": "load",
    "workload": "digits-mlp",
    "workload_config": {"limit_train": 256},
    "epochs": 2,
    "seeds": 2,
    "optimizers": [
        {"name": "koala-v"},
        {"name": "sgd", "params": {"lr": 0.1}},
        {"name": "adam", "search": {"lr": {"low": 1e-4, "high": 1e-1, "log": True}}, "trials": 4},
    ],
}


def percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def hey(url: str, args: argparse.Namespace, *extra: str) -> dict[str, float]:
    """Load `url` for `args.seconds` with hey and summarise its per-request CSV (response-time s, status-code).

    Paced clients are separate hey processes (`-c 1 -q rate`) started at evenly spread offsets within one interval:
    independent pollers, not one hey whose workers all fire on the same tick (that measures a 50-request burst)."""
    base = ["hey", "-z", f"{args.seconds}s", "-o", "csv", *extra]
    if args.rate <= 0:
        commands = [[*base, "-c", str(args.clients), url]]
    else:
        commands = [[*base, "-c", "1", "-q", str(args.rate), url] for _ in range(args.clients)]
    processes = []
    for index, command in enumerate(commands):
        if args.rate > 0:
            time.sleep(1 / (args.rate * args.clients) if index else 0)
        processes.append(subprocess.Popen(command, stdout=subprocess.PIPE, text=True))
    rows = []
    for process in processes:
        output, _ = process.communicate()
        rows += list(csv.DictReader(io.StringIO(output)))
    times = sorted(1000 * float(row["response-time"]) for row in rows)
    errors = sum(not row["status-code"].startswith("2") for row in rows)
    return {
        "requests": len(rows),
        "rps": len(rows) / args.seconds,
        "p50": percentile(times, 0.5),
        "p99": percentile(times, 0.99),
        "max": times[-1],
        "errors": errors,
    }


def run(args: argparse.Namespace, url: str, data_dir: Path) -> list[tuple[str, dict[str, float]]]:
    with httpx.Client(base_url=url, timeout=30) as http:
        ids = [http.post("/v1/jobs", json={**SPEC, "name": f"load {i}"}).json()["id"] for i in range(args.jobs)]
        body = data_dir / "spec.json"
        body.write_text(json.dumps(SPEC))
        results = [
            ("GET /v1/jobs/{id}", hey(f"{url}/v1/jobs/{ids[len(ids) // 2]}", args)),
            ("GET /v1/jobs?limit=20", hey(f"{url}/v1/jobs?limit=20", args)),
            ("POST /v1/jobs", hey(f"{url}/v1/jobs", args, "-m", "POST", "-T", "application/json", "-D", str(body))),
        ]
        # The submitted jobs, cancelled right away (untimed).
        for job in http.get("/v1/jobs", params={"state": "queued", "limit": 200}).json()["jobs"]:
            http.post(f"/v1/jobs/{job['id']}/cancel")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--rate", type=float, default=10, help="requests per second per client (0: back to back)")
    parser.add_argument("--jobs", type=int, default=200, help="jobs stored before the reads")
    parser.add_argument("--database-url", help="default: SQLite in a temporary directory")
    parser.add_argument("--workers", type=int, default=1, help="API worker processes (koala serve --workers)")
    args = parser.parse_args()
    if shutil.which("hey") is None:
        sys.exit("bench/service_load.py needs the `hey` load generator: apt-get install hey")
    with tempfile.TemporaryDirectory(prefix="koala-load-") as tmp:
        data_dir = Path(tmp)
        env = {k: v for k, v in os.environ.items() if not k.startswith("KOALA_")}
        env |= {
            "KOALA_DATA_DIR": str(data_dir),
            "KOALA_DATABASE_URL": args.database_url or f"sqlite:///{data_dir / 'koala.db'}",
            "KOALA_RUN_SCHEDULER": "false",
            "KOALA_WORKERS": str(args.workers),
            # One client submits everything here: lift the per-token queue cap so submits are measured, not 429s.
            "KOALA_MAX_QUEUED_JOBS_PER_OWNER": "1000000",
        }
        server = LiveServer(data_dir, env).start()
        try:
            results = run(args, server.url, data_dir)
        finally:
            server.stop()
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line), "?")
    pace = f"{args.rate:g} requests/s each" if args.rate > 0 else "back to back"
    print(
        f"{time.strftime('%Y-%m-%d')}, {model}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"{args.clients} clients, {pace}, {args.seconds} s per phase, {args.workers} API process(es), "
        f"{'PostgreSQL' if args.database_url else 'SQLite'}"
    )
    print("| request | requests | req/s | p50 ms | p99 ms | max ms | errors |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results:
        print(
            f"| {name} | {r['requests']:.0f} | {r['rps']:.0f} | {r['p50']:.1f} | {r['p99']:.1f} | {r['max']:.1f} "
            f"| {r['errors']:.0f} |"
        )


if __name__ == "__main__":
    main()
