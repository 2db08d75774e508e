"""Latency of the HTTP API under load: 50 concurrent clients for 20 s on loopback against a real `koala serve`.

The load comes from `hey` (Debian/Ubuntu: `apt-get install hey`), one process per client, recording every
response. Three phases: GET /v1/jobs/{id}, GET /v1/jobs (a page of 20 out of `--jobs` stored jobs) and POST
/v1/jobs (a valid spec; the jobs are cancelled right away, outside the timing). `--rate` is each client's requests
per second (a polling client; 0 = back to back, which measures saturation instead: in a closed loop latency is
concurrency / throughput). The server runs without its scheduler, so the figures are the API's alone; the hey
processes share the machine's cores with it.

History (`--history 2000`, 0 to skip): GET /v1/jobs/{id}/trials and /results of one finished job (the JobSpec below,
its 10 trials recorded as a driver records them) on a database holding 10 such finished jobs with their studies, and
on one holding `--history` of them, a server on each, taking turns (`--history-rounds`), with `--history-clients`
clients polling at `--history-rate` (below saturation, so the figures are the requests' own cost). What a job's reads
cost should not grow with the jobs before it (goal: p99 within 20% of the 10-job figures). Also timed, in this
process: finding the job's studies by listing every study (the former lookup) against looking each up by name.
`--skip-load` runs the history phase alone.

    python bench/service_load.py [--clients 50] [--seconds 20] [--rate 10] [--jobs 200] [--workers 1]
                                 [--history 2000] [--history-clients 5] [--history-rate 2] [--history-rounds 3]
                                 [--server-tree DIR]
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
import uuid
from pathlib import Path

import httpx
import optuna
import sqlalchemy as sa
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from service.jobspec import JobSpec
from service.recorder import Recorder, job_study_names, storage_for
from service.store import Store, events, jobs
from service.testing import LiveServer

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


def populate(database_url: str, count: int) -> str:
    """Store `count` finished jobs of SPEC, each with its studies and trials as a driver records them (study
    attributes, per-trial attributes, a metric per epoch); returns the id of the first."""
    store = Store(database_url)
    store.migrate()
    storage = storage_for(database_url)
    engine = storage.engine  # type: ignore[attr-defined]  # an RDBStorage
    if engine.dialect.name == "sqlite":  # building the fixture only: no fsync per commit
        sa.event.listen(engine, "connect", lambda connection, _: connection.execute("PRAGMA synchronous=OFF"))
        engine.dispose()
    spec = JobSpec.parse(SPEC)
    first = ""
    try:
        for index in range(count):
            progress = {e.name: {"done": spec.trials_of(e), "total": spec.trials_of(e)} for e in spec.optimizers}
            job, _ = store.create_job(
                spec.model_dump(mode="json"), name=f"history {index}", workload=spec.workload, progress=progress
            )
            generation = store.claim(job.id, "bench")
            recorder = Recorder(storage, job.id, spec)
            for entry in spec.optimizers:
                phases = [("tune", 0)] * (entry.trials or 0) + [("eval", seed) for seed in spec.seed_list]
                for number, (phase, seed) in enumerate(phases):
                    lr = 0.001 * (number + 1)
                    trial = optuna.trial.create_trial(
                        state=TrialState.COMPLETE,
                        value=0.9 + 0.001 * number,
                        params={"lr": lr} if entry.tuned else {},
                        distributions={"lr": FloatDistribution(1e-4, 1e-1, log=True)} if entry.tuned else {},
                        intermediate_values={epoch: 0.8 + 0.05 * epoch for epoch in range(1, spec.epochs + 1)},
                        user_attrs={
                            "optimizer": entry.name,
                            "seed": seed,
                            "phase": phase,
                            "hyperparams": {**entry.params, **({"lr": lr} if entry.tuned else {})},
                            "epochs_done": spec.epochs,
                            "wall_seconds": 1.5,
                            "epoch_seconds": [0.75] * spec.epochs,
                            "device": "cpu",
                            "node": "bench",
                            "diverged": False,
                            "reason": None,
                        },
                    )
                    recorder.study(entry.name).add_trial(trial)
            assert generation is not None
            store.finish(job.id, "succeeded", generation=generation)
            first = first or job.id
    finally:
        engine.dispose()
        store.close()
    return first


def clone(database_url: str, template: str, count: int) -> None:
    """Add `count` copies of finished job `template` (its row, its events, its studies with every trial and
    attribute, under the copy's own study names), in a few transactions: building thousands of jobs through Optuna's
    API one write at a time would take most of an hour here. SQLite only (ids are assigned here)."""
    engine = sa.create_engine(database_url)
    optuna_tables = sa.MetaData()
    optuna_tables.reflect(engine)
    t = optuna_tables.tables
    study_children = ["study_directions", "study_user_attributes", "study_system_attributes"]
    trial_children = [
        "trial_params",
        "trial_values",
        "trial_intermediate_values",
        "trial_user_attributes",
        "trial_system_attributes",
        "trial_heartbeats",
    ]
    with engine.begin() as db:
        job = dict(db.execute(sa.select(jobs).where(jobs.c.id == template)).mappings().one())
        job_events = [dict(r) for r in db.execute(sa.select(events).where(events.c.job_id == template)).mappings()]
        prefix = f"job-{template}/"
        studies = [
            dict(r)
            for r in db.execute(sa.select(t["studies"]).where(t["studies"].c.study_name.startswith(prefix))).mappings()
        ]
        study_ids = [r["study_id"] for r in studies]
        rows: dict[str, list[dict[str, object]]] = {
            name: [dict(r) for r in db.execute(sa.select(t[name]).where(t[name].c.study_id.in_(study_ids))).mappings()]
            for name in [*study_children, "trials"]
        }
        trial_ids = [r["trial_id"] for r in rows["trials"]]
        for name in trial_children:
            query = sa.select(t[name]).where(t[name].c.trial_id.in_(trial_ids))
            rows[name] = [dict(r) for r in db.execute(query).mappings()]
    names = [*study_children, "trials", *trial_children, "studies"]
    done = 0
    while done < count:
        batch = min(200, count - done)
        with engine.begin() as db:
            top = {
                name: db.execute(sa.select(sa.func.max(next(iter(t[name].primary_key))))).scalar() or 0
                for name in names
            }
            top_event = db.execute(sa.select(sa.func.max(events.c.id))).scalar() or 0
            new_jobs, new_events = [], []
            new_rows: dict[str, list[dict[str, object]]] = {name: [] for name in names}
            for k in range(1, batch + 1):
                job_id = uuid.uuid4().hex[:12]
                new_jobs.append({**job, "id": job_id, "name": f"history {done + k}"})
                for event in job_events:
                    top_event += 1
                    new_events.append({**event, "id": top_event, "job_id": job_id})
                study_of = {sid: top["studies"] + k * len(study_ids) + i for i, sid in enumerate(study_ids)}
                trial_of = {tid: top["trials"] + k * len(trial_ids) + i for i, tid in enumerate(trial_ids)}
                for study in studies:
                    name = str(study["study_name"]).replace(prefix, f"job-{job_id}/", 1)
                    new_rows["studies"].append({**study, "study_id": study_of[study["study_id"]], "study_name": name})
                for name in [*study_children, "trials", *trial_children]:
                    key = next(iter(t[name].primary_key)).name
                    for index, row in enumerate(rows[name]):
                        copy = {**row, key: top[name] + k * len(rows[name]) + index}
                        if "study_id" in copy:
                            copy["study_id"] = study_of[row["study_id"]]
                        if "trial_id" in copy:
                            copy["trial_id"] = trial_of[row["trial_id"]]
                        new_rows[name].append(copy)
            db.execute(jobs.insert(), new_jobs)
            if new_events:
                db.execute(events.insert(), new_events)
            for name in ["studies", *study_children, "trials", *trial_children]:
                if new_rows[name]:
                    db.execute(t[name].insert(), new_rows[name])
        done += batch
    engine.dispose()


def history(args: argparse.Namespace, env: dict[str, str], root: Path) -> list[tuple[int, str, dict[str, float]]]:
    """The reads of one finished job with 10 jobs in the database and with `args.history`: both servers run at once
    and take turns (`args.history_rounds` rounds), so a change in the machine's load hits both alike."""
    paced = argparse.Namespace(**{**vars(args), "clients": args.history_clients, "rate": args.history_rate})
    counts = (10, args.history)
    servers, jobs_read, timings = {}, {}, {}
    try:
        for count in counts:
            data_dir = root / f"history-{count}"
            data_dir.mkdir()
            url = f"sqlite:///{data_dir / 'koala.db'}"
            started = time.perf_counter()
            jobs_read[count] = populate(url, 1)
            clone(url, jobs_read[count], count - 1)
            print(f"({count} finished jobs stored in {time.perf_counter() - started:.0f} s)", file=sys.stderr)
            timings[count] = lookup_timing(url, jobs_read[count])
            settings = {"KOALA_DATA_DIR": str(data_dir), "KOALA_DATABASE_URL": url}
            servers[count] = LiveServer(data_dir, {**env, **settings}).start()
        rounds: dict[tuple[int, str], list[dict[str, float]]] = {}
        for _ in range(args.history_rounds):
            for count in counts:
                for path in ("trials", "results"):
                    url = f"{servers[count].url}/v1/jobs/{jobs_read[count]}/{path}"
                    rounds.setdefault((count, f"GET /v1/jobs/{{id}}/{path}"), []).append(hey(url, paced))
    finally:
        for server in servers.values():
            server.stop()
    results = []
    for count in counts:
        for (measured, name), runs in rounds.items():
            if measured == count:  # the round with the median p99
                results.append((count, name, sorted(runs, key=lambda r: r["p99"])[len(runs) // 2]))
        results.append((count, "finding the studies: list every study (ms)", timings[count]["listing"]))
        results.append((count, "finding the studies: by name (ms)", timings[count]["by_name"]))
    return results


def lookup_timing(url: str, job_id: str) -> dict[str, dict[str, float]]:
    """Milliseconds to find the job's studies by listing every study (20 rounds: seconds each with thousands of
    studies), and by name (200 rounds)."""
    storage = storage_for(url)
    names = [entry["name"] for entry in SPEC["optimizers"]]
    out = {}
    try:
        for how, find, rounds in (
            ("listing", lambda: job_study_names(storage, job_id), 20),
            ("by_name", lambda: job_study_names(storage, job_id, names), 200),
        ):
            times = []
            for _ in range(rounds):
                started = time.perf_counter()
                assert len(find()) == len(names)
                times.append(1000 * (time.perf_counter() - started))
            times.sort()
            out[how] = {
                "requests": rounds,
                "rps": 0,
                "p50": percentile(times, 0.5),
                "p99": percentile(times, 0.99),
                "max": times[-1],
                "errors": 0,
            }
    finally:
        storage.engine.dispose()  # type: ignore[attr-defined]
    return out


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
    parser.add_argument(
        "--history", type=int, default=2000, help="finished jobs stored for the history phase (0: skip)"
    )
    parser.add_argument("--history-clients", type=int, default=5, help="paced clients of the history phase")
    parser.add_argument(
        "--history-rate", type=float, default=2, help="requests per second per client of the history phase"
    )
    parser.add_argument("--history-rounds", type=int, default=3, help="turns each history server takes")
    parser.add_argument("--skip-load", action="store_true", help="only the history phase")
    parser.add_argument(
        "--server-tree",
        type=Path,
        help="run the servers from the code in this directory (e.g. a git worktree of an earlier commit), with this "
        "environment's packages; default: this checkout",
    )
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
        if args.server_tree:
            tree = args.server_tree.resolve()
            env["PYTHONPATH"] = os.pathsep.join([str(tree), str(tree / "clients"), env.get("PYTHONPATH", "")])
            os.chdir(tree)  # `python -m` puts the working directory first on the servers' sys.path
        results = []
        if not args.skip_load:
            server = LiveServer(data_dir, env).start()
            try:
                results = run(args, server.url, data_dir)
            finally:
                server.stop()
        past = history(args, env, data_dir) if args.history > 0 else []
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line), "?")
    pace = f"{args.rate:g} requests/s each" if args.rate > 0 else "back to back"
    print(
        f"{time.strftime('%Y-%m-%d')}, {model}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"{args.clients} clients, {pace}, {args.seconds} s per phase, {args.workers} API process(es), "
        f"{'PostgreSQL' if args.database_url else 'SQLite'}"
    )
    if results:
        print("| request | requests | req/s | p50 ms | p99 ms | max ms | errors |")
        print("|---|---|---|---|---|---|---|")
        for name, r in results:
            print(
                f"| {name} | {r['requests']:.0f} | {r['rps']:.0f} | {r['p50']:.1f} | {r['p99']:.1f} | {r['max']:.1f} "
                f"| {r['errors']:.0f} |"
            )
    if past:
        print(
            f"\nOne finished job's reads with 10 and with {args.history} finished jobs in the database (SQLite; "
            f"{args.history_clients} clients, {args.history_rate:g} requests/s each, {args.seconds} s per phase, the "
            f"two servers taking turns, the round with the median p99 of {args.history_rounds}; the rows 'finding the "
            "studies': in-process lookups)"
        )
        print("| jobs stored | request | requests | p50 ms | p99 ms | max ms | errors | p99 / p99 with 10 |")
        print("|---|---|---|---|---|---|---|---|")
        base = {name: r["p99"] for count, name, r in past if count == 10}
        for count, name, r in past:
            print(
                f"| {count} | {name} | {r['requests']:.0f} | {r['p50']:.1f} | {r['p99']:.1f} | {r['max']:.1f} "
                f"| {r['errors']:.0f} | {r['p99'] / base[name]:.2f} |"
            )


if __name__ == "__main__":
    main()
