"""bench/gpu_e2e.sh on a machine without a GPU: the jobs run through the service on the CPU, the GPU parts are
skipped with a message, and every output the script promises is there."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "E2E_EPOCHS": "1",
    "E2E_SEEDS": "1",
    "E2E_ADAM_TRIALS": "2",
    "E2E_CONCURRENT_TRIALS": "2",
    "E2E_DIGITS_LIMIT": "128",
    "E2E_CIFAR_IMAGES": "100",
    "E2E_CIFAR_LIMIT_TRAIN": "64",
    "E2E_CIFAR_LIMIT_VAL": "32",
    "E2E_CIFAR_WIDTH": "8",
    "E2E_BATCH": "16",
    "E2E_JOB_TIMEOUT": "600",
}


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU run; on a GPU machine run the script itself")
def test_gpu_e2e_runs_on_a_cpu_machine(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KOALA_", "RAY_ADDRESS", "E2E_"))}
    result = subprocess.run(
        [str(ROOT / "bench" / "gpu_e2e.sh"), str(out)],
        env={**env, **TINY},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = (out / "e2e.log").read_text()
    assert "no CUDA device: the GPU parts are skipped" in log
    assert "bench/optimizer_step.py --device cuda" in log  # said to be skipped
    for workload in ("digits-cnn", "cifar10-resnet18"):
        folder = out / workload
        spec = json.loads((folder / "spec.json").read_text())
        assert spec["resources"] == {"cpu": 1, "gpu": 0}  # {gpu: 0.5} where there is a GPU
        assert json.loads((folder / "job.json").read_text())["state"] == "succeeded"
        trials = json.loads((folder / "trials.json").read_text())
        assert len(trials) == 7  # koala-v, koala-m, koala-diag, sgd on one seed; adam: 2 tuning trials and its best
        assert {t["device"] for t in trials} == {"cpu"}
        assert all(t["state"] == "complete" and t["started_at"] and t["finished_at"] for t in trials)
        report = json.loads((folder / "report.json").read_text())
        assert {row["optimizer"] for row in report["optimizers"]} == {"koala-v", "koala-m", "koala-diag", "sgd", "adam"}
    summary = (out / "summary.md").read_text()
    assert "| digits-cnn | succeeded | 7 | cpu |" in summary
    assert "| cifar10-resnet18 | succeeded | 7 | cpu |" in summary
    assert "GPU utilisation: skipped (no CUDA device)" in summary
    assert not (out / "nvidia_smi.csv").exists()
    assert not (out / "step_cuda.json").exists()
    # The generated dataset is CIFAR-10's own format, read by the workload from $KOALA_DATA_DIR/datasets.
    batches = out / "koala" / "datasets" / "cifar-10-batches-py"
    assert sorted(p.name for p in batches.iterdir()) == [
        "batches.meta",
        *(f"data_batch_{k}" for k in range(1, 6)),
        "test_batch",
    ]
