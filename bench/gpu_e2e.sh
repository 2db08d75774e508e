#!/usr/bin/env bash
# GPU trials through the service, end to end, in one run: starts `koala serve` (PostgreSQL when one answers at
# 127.0.0.1:5432, else SQLite) with its Ray head, writes a small CIFAR-10 in the real python-pickle format under
# $KOALA_DATA_DIR/datasets/cifar-10-batches-py, and submits two JobSpecs at once, digits-cnn and cifar10-resnet18
# (limit_train), each comparing KOALA-V, KOALA-M and KOALA-Diag at their defaults with SGD and an Optuna-tuned Adam,
# every trial asking for `resources: {gpu: 0.5}` (two trials per GPU). It waits for both, and saves under OUT_DIR: per
# job the spec, the job, its trials (device and node per trial) and its report; `nvidia-smi --query-gpu` samples every
# 0.5 s while the jobs run; a bf16-autocast training run on CUDA per KOALA variant; the optimizer step benchmark on CUDA
# (bench/optimizer_step.py --device cuda); and summary.md: trials per minute, GPU utilisation while trials ran, and the
# KOALA step times over fused Adam's.
#
# On a machine without a CUDA device it runs the same jobs on the CPU (resources gpu 0) and skips the GPU parts,
# saying so. Sizes come from the environment (defaults in brackets): E2E_EPOCHS [3], E2E_SEEDS [2],
# E2E_ADAM_TRIALS [4], E2E_CONCURRENT_TRIALS [4], E2E_DIGITS_LIMIT [0: all], E2E_CIFAR_IMAGES [5000],
# E2E_CIFAR_LIMIT_TRAIN [2048], E2E_CIFAR_LIMIT_VAL [512], E2E_CIFAR_WIDTH [64], E2E_BATCH [128],
# E2E_JOB_TIMEOUT [1800 s]; E2E_DATABASE=sqlite skips PostgreSQL; KOALA_E2E_POSTGRES names the PostgreSQL server
# [postgresql+psycopg://postgres@127.0.0.1:5432/postgres], on which a database is created for the run and dropped.
#
# Usage: bench/gpu_e2e.sh OUT_DIR
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bench/gpu_e2e.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
if [ -n "${PYTHON:-}" ]; then python=$PYTHON; elif [ -x .venv/bin/python ]; then python=$PWD/.venv/bin/python; else
    python=python3
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export E2E_OUT=$out
status=0
log() { echo "[gpu_e2e $(date -u +%H:%M:%S)] $*" | tee -a "$out/e2e.log" >&2; }

gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 &&
    "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    gpu=1
fi
export E2E_GPU=$gpu
{
    date -u
    "$python" -c 'import sys, torch, ray, optuna; print("python", sys.version.split()[0], "torch", torch.__version__,
"ray", ray.__version__, "optuna", optuna.__version__, "cuda", torch.cuda.is_available())'
    nproc
    if [ "$gpu" = 1 ]; then nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; fi
} >"$out/machine.txt" 2>&1
if [ "$gpu" = 0 ]; then
    log "no CUDA device: the GPU parts are skipped (trials run on the CPU with resources gpu 0; no nvidia-smi" \
        "samples, no bf16 check on CUDA, no CUDA step benchmark)"
fi

# ---- data, database, server ------------------------------------------------------------------------------------
export KOALA_DATA_DIR=$out/koala
mkdir -p "$KOALA_DATA_DIR/datasets"
"$python" - <<'PY' || { log "could not write the CIFAR-10 files"; exit 1; }
"""A small CIFAR-10 in the real python-pickle format: 5 training batches and a test batch, random images."""
import os, pickle
from pathlib import Path

import numpy as np

images = int(os.environ.get("E2E_CIFAR_IMAGES", "5000"))
folder = Path(os.environ["KOALA_DATA_DIR"]) / "datasets" / "cifar-10-batches-py"
folder.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
per_file = max(1, images // 5)
batches = [(f"data_batch_{k}", b"training batch %d of 5" % k, per_file) for k in range(1, 6)]
for name, label, count in [*batches, ("test_batch", b"testing batch 1 of 1", max(1, images // 5))]:
    content = {
        b"batch_label": label,
        b"labels": rng.integers(0, 10, count).tolist(),
        b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
        b"filenames": [b"image_%d.png" % i for i in range(count)],
    }
    with open(folder / name, "wb") as f:
        pickle.dump(content, f)
names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
with open(folder / "batches.meta", "wb") as f:
    pickle.dump({b"label_names": names, b"num_cases_per_batch": per_file, b"num_vis": 3072}, f)
PY

database=$("$python" - <<'PY'
"""A fresh PostgreSQL database when a server answers (its URL), else SQLite under the data directory."""
import os, secrets

url = os.environ.get("KOALA_E2E_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
sqlite = f"sqlite:///{os.environ['KOALA_DATA_DIR']}/koala.db"
if os.environ.get("E2E_DATABASE") == "sqlite":
    print(sqlite)
    raise SystemExit
try:
    import psycopg
    from sqlalchemy.engine import make_url

    server = make_url(url)
    name = f"koala_e2e_{secrets.token_hex(4)}"
    with psycopg.connect(server.set(drivername="postgresql").render_as_string(hide_password=False),
                         autocommit=True, connect_timeout=3) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    print(server.set(database=name).render_as_string(hide_password=False))
except Exception:
    print(sqlite)
PY
)
export KOALA_DATABASE_URL=$database
case $database in
postgresql*) log "database: PostgreSQL (${database##*/}, dropped at the end)" ;;
*) log "database: SQLite (no PostgreSQL answered at 127.0.0.1:5432)" ;;
esac
port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export E2E_URL=http://127.0.0.1:$port
unset RAY_ADDRESS  # the service's own Ray head
export KOALA_MAX_CONCURRENT_JOBS=2 KOALA_MAX_RUNNING_JOBS_PER_OWNER=2
"$python" -m koala_client.cli serve --port "$port" >"$out/server.log" 2>&1 &
server=$!
sampler=""
cleanup() {
    [ -n "$sampler" ] && kill "$sampler" 2>/dev/null
    if kill -0 "$server" 2>/dev/null; then
        kill -INT "$server"
        for _ in $(seq 60); do kill -0 "$server" 2>/dev/null || break; sleep 0.5; done
        kill -9 "$server" 2>/dev/null
    fi
    case $database in
    postgresql*)
        "$python" - <<'PY' || true
import os

import psycopg
from sqlalchemy.engine import make_url

url = make_url(os.environ["KOALA_DATABASE_URL"])
admin = url.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
with psycopg.connect(admin, autocommit=True, connect_timeout=3) as connection:
    connection.execute(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)')
PY
        ;;
    esac
}
trap cleanup EXIT

if [ "$gpu" = 1 ]; then
    nvidia-smi --query-gpu=timestamp,index,name,utilization.gpu,utilization.memory,memory.used,memory.total,power.draw \
        --format=csv -lms 500 >"$out/nvidia_smi.csv" 2>"$out/nvidia_smi.err" &
    sampler=$!
fi

# ---- the jobs ----------------------------------------------------------------------------------------------------
"$python" - <<'PY' 2>&1 | tee -a "$out/e2e.log" || status=1
"""Submit both JobSpecs at once, wait for both, save what each produced."""
import json, os, time
from pathlib import Path

import httpx

env = os.environ
out, gpu = Path(env["E2E_OUT"]), env["E2E_GPU"] == "1"
epochs, seeds = int(env.get("E2E_EPOCHS", "3")), int(env.get("E2E_SEEDS", "2"))
batch = int(env.get("E2E_BATCH", "128"))
optimizers = [
    {"name": "koala-v"},
    {"name": "koala-m"},
    {"name": "koala-diag"},
    {"name": "sgd", "params": {"lr": 0.05, "momentum": 0.9}},
    {"name": "adam", "search": {"lr": {"low": 1e-4, "high": 1e-2, "log": True}},
     "trials": int(env.get("E2E_ADAM_TRIALS", "4"))},
]
configs = {
    "digits-cnn": {"batch_size": min(batch, 64), "limit_train": int(env.get("E2E_DIGITS_LIMIT", "0"))},
    "cifar10-resnet18": {
        "batch_size": batch,
        "width": int(env.get("E2E_CIFAR_WIDTH", "64")),
        "limit_train": int(env.get("E2E_CIFAR_LIMIT_TRAIN", "2048")),
        "limit_val": int(env.get("E2E_CIFAR_LIMIT_VAL", "512")),
    },
}
with httpx.Client(base_url=env["E2E_URL"], timeout=60) as http:
    deadline = time.monotonic() + 300
    while True:  # the API answers, and the service's Ray head runs
        try:
            ready = http.get("/readyz").json()
            if str(ready.get("ray", "")).startswith("local head at"):
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"the service did not get ready: {(out / 'server.log').read_text()[-3000:]}")
        time.sleep(1)
    jobs = {}
    for workload, config in configs.items():
        spec = {
            "name": f"gpu e2e {workload}",
            "workload": workload,
            "workload_config": config,
            "epochs": epochs,
            "seeds": seeds,
            "max_concurrent_trials": int(env.get("E2E_CONCURRENT_TRIALS", "4")),
            "resources": {"cpu": 1, "gpu": 0.5 if gpu else 0},
            "optimizers": optimizers,
        }
        response = http.post("/v1/jobs", json=spec)
        if response.status_code != 202:
            raise SystemExit(f"{workload}: the service refused the job: {response.text}")
        jobs[workload] = response.json()["id"]
        folder = out / workload
        folder.mkdir(exist_ok=True)
        (folder / "spec.json").write_text(json.dumps(spec, indent=2) + "\n")
        print(f"submitted {workload}: job {jobs[workload]}", flush=True)
    timeout = float(env.get("E2E_JOB_TIMEOUT", "1800"))
    deadline = time.monotonic() + timeout
    ended = {}
    while len(ended) < len(jobs):
        for workload, job_id in jobs.items():
            job = http.get(f"/v1/jobs/{job_id}").json()
            if workload not in ended and job["state"] in ("succeeded", "failed", "cancelled"):
                ended[workload] = job
                print(f"{workload}: {job['state']} {job.get('error') or ''}", flush=True)
        if time.monotonic() > deadline:
            for workload, job_id in jobs.items():
                if workload not in ended:
                    http.post(f"/v1/jobs/{job_id}/cancel")
            raise SystemExit(f"jobs still running after {timeout:g} s: {sorted(set(jobs) - set(ended))} (cancelled)")
        time.sleep(2)
    failed = []
    for workload, job_id in jobs.items():
        folder = out / workload
        (folder / "job.json").write_text(json.dumps(ended[workload], indent=2) + "\n")
        trials = http.get(f"/v1/jobs/{job_id}/trials").json()
        (folder / "trials.json").write_text(json.dumps(trials, indent=2) + "\n")
        results = http.get(f"/v1/jobs/{job_id}/results")
        (folder / "report.json").write_text(json.dumps(results.json(), indent=2) + "\n")
        devices = sorted({str(t.get("device")) for t in trials})
        print(f"{workload}: {len(trials)} trials on {devices}", flush=True)
        if ended[workload]["state"] != "succeeded":
            failed.append(workload)
if failed:
    raise SystemExit(f"job(s) did not succeed: {failed}")
PY
[ -n "$sampler" ] && kill "$sampler" 2>/dev/null
sampler=""

# ---- GPU only: bf16 autocast in the training loop, and the optimizer step on CUDA -----------------------------------
if [ "$gpu" = 1 ]; then
    timeout 600 "$python" - >"$out/bf16_cuda.json" 2>"$out/bf16_cuda.log" <<'PY' || { log "bf16 check failed"; status=1; }
"""koala.train.run with bf16 autocast on CUDA, for each KOALA variant: finite, learning, on the GPU."""
import json, time

from koala import train

rows = []
for optimizer in ("koala-v", "koala-m", "koala-diag"):
    started = time.perf_counter()
    result = train.run("digits-cnn", optimizer, seed=0, epochs=5, device="cuda", amp=True)
    rows.append({"optimizer": optimizer, "diverged": result.diverged, "val_accuracy": result.final("val_accuracy"),
                 "seconds": time.perf_counter() - started})
print(json.dumps(rows, indent=2))
PY
    timeout 600 "$python" bench/optimizer_step.py --device cuda --json "$out/step_cuda.json" >"$out/step_cuda.md" \
        2>&1 || { log "CUDA step benchmark failed"; status=1; }
else
    log "skipped on this machine (no CUDA device): bf16 check on CUDA, bench/optimizer_step.py --device cuda"
fi

# ---- summary -----------------------------------------------------------------------------------------------------
"$python" - <<'PY' || status=1
"""summary.md: trials per minute per job, GPU utilisation while trials ran, KOALA step time over fused Adam's."""
import csv, json, os
from datetime import datetime
from pathlib import Path

out = Path(os.environ["E2E_OUT"])
lines = ["# GPU trials through the service, end to end", "", (out / "machine.txt").read_text().strip(), ""]
intervals = []
lines += ["| job | state | trials | devices | wall min | trials per minute | compute s |", "|---|---|---|---|---|---|---|"]
for folder in sorted(p for p in out.iterdir() if (p / "job.json").exists()):
    job = json.loads((folder / "job.json").read_text())
    trials = json.loads((folder / "trials.json").read_text())
    spans = [(datetime.fromisoformat(t["started_at"]), datetime.fromisoformat(t["finished_at"]))
             for t in trials if t.get("started_at") and t.get("finished_at")]
    intervals += spans
    minutes = (datetime.fromisoformat(job["finished_at"]) - datetime.fromisoformat(job["started_at"])).total_seconds()
    minutes /= 60
    devices = ", ".join(sorted({str(t.get("device")) for t in trials}))
    compute = sum(float(t.get("wall_seconds") or 0) for t in trials)
    rate = len(trials) / minutes if minutes > 0 else float("nan")
    lines.append(f"| {folder.name} | {job['state']} | {len(trials)} | {devices} | {minutes:.2f} | {rate:.1f} "
                 f"| {compute:.0f} |")
samples = out / "nvidia_smi.csv"
if samples.exists():
    busy, idle = [], []
    with samples.open() as f:
        for row in csv.DictReader(f, skipinitialspace=True):
            try:
                at = datetime.strptime(row["timestamp"], "%Y/%m/%d %H:%M:%S.%f").astimezone()
                value = float(row["utilization.gpu [%]"].split()[0])
            except (KeyError, ValueError):
                continue
            (busy if any(start <= at <= end for start, end in intervals) else idle).append(value)
    mean = lambda values: sum(values) / len(values) if values else float("nan")  # noqa: E731
    lines += ["", f"GPU utilisation (nvidia-smi, every 0.5 s): {mean(busy):.0f}% mean over {len(busy)} samples while "
              f"trials ran, {mean(idle):.0f}% over {len(idle)} other samples"]
else:
    lines += ["", "GPU utilisation: skipped (no CUDA device)"]
step = out / "step_cuda.json"
if step.exists():
    lines += ["", "Optimizer step on CUDA (x fused Adam, median):"]
    for result in json.loads(step.read_text())["results"]:
        ratios = {r["name"]: r["vs_adam"] for r in result["rows"]}
        picked = [f"{name} {ratios[name]:.2f}" for name in ("KoalaV(foreach=True)", "KoalaM(foreach=True)")
                  if ratios.get(name) is not None]
        lines.append(f"- {result['name']}: " + ", ".join(picked))
else:
    lines += ["", "Optimizer step on CUDA: skipped (no CUDA device)"]
bf16 = out / "bf16_cuda.json"
if bf16.exists():
    lines += ["", "bf16 autocast on CUDA (digits-cnn, 5 epochs): " + "; ".join(
        f"{r['optimizer']} val_accuracy {r['val_accuracy']:.3f}, diverged {r['diverged']}"
        for r in json.loads(bf16.read_text()))]
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
log "done (status $status); results in $out"
exit $status
