"""The HTTP service through a real `koala serve` process, for what needs one: binding an address, jobs that run,
kill -9 and restarts, dead drivers, the CLI and the SDK end to end, several API processes. Jobs run on the
service's own local Ray head. (The API's requests alone: in-process, tests/test_api.py.)"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from koala_client import KoalaClient
from service.testing import free_port
from tests.helpers import (
    ENDED,
    LONGER_DIGITS,
    Factory,
    assert_each_planned_trial_once,
    driver_pid,
    koala_cli,
    tiny_spec,
    wait_for,
    wait_until,
)

# ---- binding an address -------------------------------------------------------------------------------------------


def test_serve_refuses_a_public_address_without_tokens(tmp_path: Any) -> None:
    env = {**os.environ, "KOALA_DATA_DIR": str(tmp_path)}
    env.pop("KOALA_DATABASE_URL", None)
    result = subprocess.run(
        [sys.executable, "-m", "koala_client.cli", "serve", "--host", "0.0.0.0", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "refusing to serve on 0.0.0.0 without API tokens" in result.stderr


# ---- running jobs: cancel, restarts, dead drivers ------------------------------------------------------------------

pytest_slow = pytest.mark.slow


@pytest_slow
def test_cancel_a_running_job(server_factory: Factory) -> None:
    server = server_factory()
    spec = tiny_spec(epochs=200, seeds=2, optimizers=[{"name": "sgd", "params": {"lr": 0.05}}])
    with server.client() as client:
        job = client.post("/v1/jobs", json=spec).json()
        wait_until(
            lambda: any(t["epochs_done"] >= 1 for t in client.get(f"/v1/jobs/{job['id']}/trials").json()),
            120,
            "no trial reached its first epoch",
        )
        asked = time.monotonic()
        assert client.post(f"/v1/jobs/{job['id']}/cancel").json()["state"] == "cancelling"
        done = wait_for(client, job["id"], {"cancelled", "failed", "succeeded"}, timeout=60)
        assert done["state"] == "cancelled"
        assert time.monotonic() - asked < 30
        trials = client.get(f"/v1/jobs/{job['id']}/trials").json()
        assert trials
        assert {t["state"] for t in trials} <= {"pruned", "complete"}
        assert any(t["state"] == "pruned" and t["reason"] == "cancelled" for t in trials)


def submit_and_wait_for_trials(client: httpx.Client, spec: dict[str, Any], done: int) -> dict[str, Any]:
    """Submit `spec` and return once `done` of its trials have finished (the job still running)."""
    job: dict[str, Any] = client.post("/v1/jobs", json=spec).json()
    wait_for(client, job["id"], {"running"})

    def finished_enough() -> bool:
        now = client.get(f"/v1/jobs/{job['id']}").json()
        assert now["state"] == "running", now
        return bool(now["trials_done"] >= done)

    wait_until(finished_enough, 240, f"{done} trials of job {job['id']} did not finish")
    return job


@pytest_slow
def test_api_killed_mid_job_then_restarted(server_factory: Factory) -> None:
    server = server_factory()
    spec = tiny_spec(epochs=15, seeds=2, workload_config=LONGER_DIGITS)
    with server.client() as client:
        job = submit_and_wait_for_trials(client, spec, done=1)
    server.kill()  # kill -9: the job's driver keeps running on its own
    time.sleep(2)
    server.start()
    with server.client() as client:
        done = wait_for(client, job["id"], ENDED)
    assert done["state"] == "succeeded", done
    assert done["attempts"] == 1  # the driver was never restarted
    assert done["trials_done"] == done["trials_total"] == 8
    assert_each_planned_trial_once(server.database_url, job["id"], spec)


@pytest_slow
def test_killed_driver_is_resumed(server_factory: Factory) -> None:
    server = server_factory()
    spec = tiny_spec(epochs=15, seeds=2, workload_config=LONGER_DIGITS)
    with server.client() as client:
        job = submit_and_wait_for_trials(client, spec, done=2)
        os.kill(driver_pid(server, job["id"]), signal.SIGKILL)
        done = wait_for(client, job["id"], ENDED)
        assert done["state"] == "succeeded", done
        assert done["attempts"] == 2
        trials = client.get(f"/v1/jobs/{job['id']}/trials").json()
        assert all(t["state"] == "complete" for t in trials)
        events = client.get(f"/v1/jobs/{job['id']}/events")
        states = [json.loads(line[5:])["data"] for line in events.text.splitlines() if line.startswith("data:")]
        assert {"state": "queued", "reason": "its driver died; resuming"} in states
    assert_each_planned_trial_once(server.database_url, job["id"], spec)


@pytest_slow
def test_driver_that_keeps_dying_fails_the_job_with_a_reason(server_factory: Factory) -> None:
    server = server_factory(max_driver_starts=1)
    spec = tiny_spec(epochs=200, seeds=2, optimizers=[{"name": "sgd", "params": {"lr": 0.05}}])
    with server.client() as client:
        job = client.post("/v1/jobs", json=spec).json()
        wait_until(
            lambda: any(t["state"] == "running" for t in client.get(f"/v1/jobs/{job['id']}/trials").json()),
            120,
            "no trial started running",
        )
        os.kill(driver_pid(server, job["id"]), signal.SIGKILL)
        done = wait_for(client, job["id"], ENDED, timeout=60)
        assert done["state"] == "failed"
        assert "driver died" in done["error"]
        trials = client.get(f"/v1/jobs/{job['id']}/trials").json()
        assert trials
        assert not [t for t in trials if t["state"] == "running"]
        assert all("driver died" in t["reason"] for t in trials if t["state"] == "fail")


# ---- the main path: the CLI submits, the SDK follows, both read the results ---------------------------------------


@pytest_slow
def test_main_path_through_the_cli_and_the_sdk(server_factory: Factory, tmp_path: Path) -> None:
    server = server_factory()
    spec = tiny_spec()
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    submitted = koala_cli(server, "submit", str(spec_file))
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()

    with KoalaClient(server.url) as client:
        done_counts: list[int] = []
        job = client.wait(job_id, progress=lambda j: done_counts.append(j.trials_done))
        assert job.state == "succeeded", job.error
        assert done_counts == sorted(done_counts)
        assert job.trials_done == job.trials_total == 8
        events = list(client.events(job_id))
        assert [e.data["state"] for e in events if e.kind == "state"] == ["queued", "running", "succeeded"]
        trials = client.trials(job_id)
        complete = [t for t in trials if t.state == "complete"]
        assert len([e for e in events if e.kind == "epoch"]) >= 2 * len(complete)
        report = client.results(job_id)

    # The report's numbers, recomputed from the trials.
    assert len(trials) == 8
    for row in report.optimizers:
        finals = [t.value for t in trials if t.optimizer == row.optimizer and t.phase == "eval" and t.value is not None]
        assert row.final_mean == pytest.approx(statistics.mean(finals))
        assert row.compute_seconds == pytest.approx(sum(t.wall_seconds for t in trials if t.optimizer == row.optimizer))
    means = {row.optimizer: row.final_mean for row in report.optimizers}
    assert report.ranking == sorted(means, key=lambda name: -(means[name] or 0))

    watched = koala_cli(server, "watch", job_id)
    assert watched.returncode == 0, watched.stderr
    assert "koala-v" in watched.stdout
    plot = tmp_path / "curves.png"
    assert koala_cli(server, "results", job_id, "--plot", str(plot)).returncode == 0
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert job_id in koala_cli(server, "jobs").stdout
    missing = koala_cli(server, "results", "nope")
    assert missing.returncode == 1
    assert "no job nope" in missing.stderr


def test_serve_with_two_api_processes(server_factory: Factory) -> None:
    server = server_factory(run_scheduler="false", workers=2)
    assert server.process is not None
    children = subprocess.run(["pgrep", "-P", str(server.process.pid)], capture_output=True, text=True).stdout.split()
    assert len(children) >= 2  # uvicorn's worker processes
    with server.client() as client:
        ids = {client.post("/v1/jobs", json=tiny_spec(name=f"job {i}")).json()["id"] for i in range(6)}
        for _ in range(10):  # requests land on both processes; every one sees the same database
            assert {job["id"] for job in client.get("/v1/jobs").json()["jobs"]} == ids
