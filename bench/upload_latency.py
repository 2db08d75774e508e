"""What shipping a workload with its job costs: time from `koala submit` to the first trial, uploaded vs installed.

Everything on this host: a two-node loopback Ray cluster (service/testing.py, 1 CPU per node), `koala serve` on
loopback whose job drivers join it, the `koala` command line as the user runs it. The workload is the example
(examples/custom_workload, a tiny regression MLP); the job is 2 seeds of SGD, 1 epoch each, 1 CPU per trial.

- installed: the workload installed on the API's machine and on both Ray nodes (a `koala.workloads` entry point on
  their PYTHONPATH), submitted by its registered name: `koala submit job.yaml`;
- upload N MB: the same workload under another package name, installed nowhere, its directory padded with random
  (incompressible) bytes so that the pack is about N MB: `koala submit job.yaml --workload-dir DIR`. Each run pads
  with fresh bytes, so neither the service nor Ray's per-node cache has seen the pack before;
- resubmitted N MB (`--resubmit`): right after an `upload N MB` run, the same directory submitted again (the same
  pack: the server keeps one copy, and its check passed before, so the driver does not run it again).

Per job, from the moment the `koala` process starts: `submitted` (it returned: packing, upload, submit), `first
trial` (the driver's first trial event: the trial handed to Ray Tune, after the driver started, connected to Ray
with the pack, and checked the workload on a node) and `first epoch` (the first trial process started, imported the
workload and finished an epoch). The driver's log gives the upload's steps: `ship` (the pack handed to Ray), `check`
(submitted to answered) and within the check `boot` (its process started to the check running) and `imports`
(koala.workloads with torch, then the uploaded module). By default the server keeps its warm checker
(service/workload_checker.py: a child forked from a server with torch loaded, so `boot` and `imports` are near
zero); `--no-warm-checker` measures the check as a Ray task under the job's runtime environment (a new worker:
Python and Ray, twice, through Ray's setup_worker, then torch). Configurations alternate, `--repeats` times each; the
table shows medians.

    python bench/upload_latency.py [--sizes 1 20] [--resubmit] [--repeats 3] [--no-warm-checker] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from service.testing import LiveServer, LoopbackCluster, kill_drivers, server_environment

ROOT = Path(__file__).resolve().parents[1]

EXAMPLE = ROOT / "examples" / "custom_workload" / "tiny_regression"
INSTALLED = "installed_regression"  # the package name of the installed copy (an entry point, `tiny-regression`)
UPLOADED = "uploaded_regression"  # the package name of the uploaded copies (importable nowhere)
MB = 1_000_000


def job(workload: str) -> dict[str, Any]:
    return {
        "name": "upload latency",
        "workload": workload,
        "workload_config": {"samples": 256, "hidden": 8},
        "epochs": 1,
        "seeds": 2,
        "max_concurrent_trials": 2,
        "resources": {"cpu": 1},
        "optimizers": [{"name": "sgd", "params": {"lr": 0.05}}],
    }


def install(site: Path) -> None:
    """The example as package INSTALLED, registered as workload `tiny-regression` by a dist-info entry point."""
    shutil.copytree(EXAMPLE, site / INSTALLED)
    info = site / "installed_regression-0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: installed-regression\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text(f"[koala.workloads]\ntiny-regression = {INSTALLED}.model:TinyRegression\n")


def padded_copy(where: Path, megabytes: float) -> Path:
    """A fresh copy of the example as package UPLOADED, whose pack is about `megabytes` MB."""
    shutil.rmtree(where, ignore_errors=True)
    target = where / UPLOADED
    shutil.copytree(EXAMPLE, target)
    code = sum(path.stat().st_size for path in target.rglob("*") if path.is_file())
    (target / "weights.bin").write_bytes(os.urandom(max(0, int(megabytes * MB) - code - 600)))
    return target


def koala(server: LiveServer, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**server.env, "KOALA_URL": server.url}
    return subprocess.run(
        [sys.executable, "-m", "koala_client.cli", *args], env=env, capture_output=True, text=True, timeout=600
    )


def settle(server: LiveServer, timeout: float = 180.0) -> None:
    """Wait until the server is idle as a user would find it: its standby driver (if it keeps one) is ready again
    after the previous job took the last one, and its warm checker of uploaded workloads (if it keeps one) answers."""
    standby = server.data_dir / "standby"
    checker = server.data_dir / "logs" / "workload-checker.log"
    deadline = time.monotonic() + timeout
    while (standby.is_dir() and not list(standby.glob("*/*/ready"))) or (
        server.env.get("KOALA_UPLOAD_CHECKER", "true") == "true"
        and not (checker.exists() and "workload checker warm" in checker.read_text(errors="replace"))
    ):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{server.url}: no standby driver ready or no warm checker within {timeout:g} s")
        time.sleep(0.2)
    time.sleep(1.0)


def run_once(server: LiveServer, spec_file: Path, workload_dir: Path | None) -> dict[str, float]:
    from service.store import Store

    settle(server)
    args = ["submit", str(spec_file)] + (["--workload-dir", str(workload_dir)] if workload_dir else [])
    started = time.time()
    result = koala(server, *args)
    submitted = time.time() - started
    if result.returncode != 0:
        raise RuntimeError(f"koala submit failed:\n{result.stderr}")
    job_id = result.stdout.strip()
    watched = koala(server, "watch", job_id)
    if watched.returncode != 0:
        raise RuntimeError(f"job {job_id} did not succeed:\n{watched.stderr}")
    store = Store(server.database_url)
    try:
        events = store.events_after(job_id, 0, limit=10_000)
    finally:
        store.close()
    first_trial = min(e.at.timestamp() for e in events if e.kind == "trial" and e.data.get("state") == "running")
    first_epoch = min(e.at.timestamp() for e in events if e.kind == "epoch")
    timing = {"submitted": submitted, "first_trial": first_trial - started, "first_epoch": first_epoch - started}
    # The driver's own account of the upload's steps (service/upload_runtime.py logs them).
    log = (server.data_dir / "logs" / f"{job_id}.log").read_text(errors="replace")
    steps = {
        "ship": r"handed to Ray in ([0-9.]+) s",
        "check": r"checked on the cluster in ([0-9.]+) s",
        "boot": r"worker started \+([0-9.]+) s",
        "koala": r"koala imported \+([0-9.]+) s",
        "module": r"workload imported \+([0-9.]+) s",
    }
    for key, pattern in steps.items():
        found = re.search(pattern, log)
        if found:
            timing[key] = float(found.group(1))
    if "koala" in timing and "module" in timing:
        timing["imports"] = timing.pop("koala") + timing.pop("module")
    if "(warm checker)" in log:
        timing["warm_checker"] = 1.0
    return timing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[1.0, 20.0], help="pack sizes, MB")
    parser.add_argument("--resubmit", action="store_true", help="also submit each fresh pack's directory again")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="append the results as one JSON line")
    parser.add_argument("--keep", action="store_true", help="keep the working directory (the drivers' logs)")
    parser.add_argument(
        "--no-warm-checker",
        action="store_true",
        help="a server without the warm checker (KOALA_UPLOAD_CHECKER=false): each fresh pack checked in a Ray task",
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="koala-upload-bench-"))
    site = work / "site"
    site.mkdir()
    install(site)
    # The Ray nodes (started from this process's environment) and the server both see the installed copy.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    installed_spec = work / "installed.yaml"
    installed_spec.write_text(yaml.safe_dump(job("tiny-regression")))
    uploaded_spec = work / "uploaded.yaml"
    uploaded_spec.write_text(yaml.safe_dump(job(f"{UPLOADED}.model:TinyRegression")))
    configs: list[tuple[str, float | None]] = [("installed", None)]
    for size in args.sizes:
        configs.append((f"upload {size:g} MB", size))
        if args.resubmit:
            configs.append((f"resubmitted {size:g} MB", size))
    results: dict[str, list[dict[str, float]]] = {name: [] for name, _ in configs}
    with LoopbackCluster() as cluster:
        cluster.add_node("a", num_cpus=1)
        cluster.add_node("b", num_cpus=1)
        data = work / "server"
        data.mkdir()
        checker = "false" if args.no_warm_checker else "true"
        server = LiveServer(data, server_environment(data, env=cluster.env, upload_checker=checker), cwd=work).start()
        try:
            run_once(server, installed_spec, None)  # warm-up: the nodes' first workers, the caches
            for repeat in range(args.repeats):
                directory: Path | None = None
                for name, size in configs:
                    if name.startswith("upload"):
                        directory = padded_copy(work / "pack", size or 0)
                    elif name == "installed":
                        directory = None
                    spec_file = uploaded_spec if size is not None else installed_spec
                    timing = run_once(server, spec_file, directory)
                    results[name].append(timing)
                    line = "  ".join(f"{key} {value:.2f} s" for key, value in timing.items())
                    print(f"{repeat + 1}/{args.repeats} {name:<18} {line}", flush=True)
        finally:
            server.stop()
            kill_drivers(server.database_url)
    if args.keep:
        print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)

    print_table(results)
    if args.out is not None:
        save(args.out, args.repeats, results)


def print_table(results: dict[str, list[dict[str, float]]]) -> None:
    """Medians per configuration, and what each adds to the installed workload's."""
    base = {key: statistics.median(r[key] for r in results["installed"]) for key in results["installed"][0]}
    header = ["submitted", "first trial", "first epoch", "added (trial)", "added (epoch)"]
    steps = ["ship", "check", "boot", "imports"]
    print(f"\n{'configuration':<18}" + "".join(f"{h:>14}" for h in header + steps))
    for name, runs in results.items():
        median = {key: statistics.median(r[key] for r in runs if key in r) for key in {k for r in runs for k in r}}
        cells = [
            median["submitted"],
            median["first_trial"],
            median["first_epoch"],
            median["first_trial"] - base["first_trial"],
            median["first_epoch"] - base["first_epoch"],
        ]
        shown = [f"{value:>13.2f}s" for value in cells]
        shown += [f"{median[key]:>13.2f}s" if key in median else f"{'-':>14}" for key in steps]
        print(f"{name:<18}" + "".join(shown))


def save(path: Path, repeats: int, results: dict[str, list[dict[str, float]]]) -> None:
    record = {
        "at": datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "repeats": repeats,
        "results": results,
    }
    with path.open("a") as out:
        out.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
