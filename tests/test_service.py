"""The HTTP service through a real `koala serve` process: jobs, restarts, auth, idempotency, validation, paging,
events. Jobs run on a real local Ray started by each job's driver."""

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
from service.store import Store
from service.testing import LiveServer, free_port
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

# ---- validation, idempotency, paging (no job runs: the scheduler is off) -----------------------------------------


@pytest.fixture
def api(server_factory: Factory) -> LiveServer:
    return server_factory(run_scheduler="false")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"workload": "imagenet"}, "workload"),
        ({"epochs": 0}, "epochs"),
        ({"epochs": 100000}, "epochs"),
        ({"seeds": []}, "seeds"),
        ({"metric": "bleu"}, "metric"),
        ({"scheduler": "hyperband"}, "scheduler"),
        ({"workload_config": {"hidden": -1}}, "workload_config"),
        ({"optimizers": []}, "optimizers"),
        ({"optimizers": [{"name": "lion"}]}, "optimizers.0.name"),
        ({"optimizers": [{"name": "sgd", "params": {"betas": 0.9}}]}, "optimizers.0"),
        (
            {"optimizers": [{"name": "adam", "search": {"lr": {"low": 1, "high": 0.1}}, "trials": 2}]},
            "optimizers.0.search.lr",
        ),
        ({"optimizers": [{"name": "sgd"}, {"name": "sgd"}]}, "optimizers"),
        ({"resources": {"cpu": 0}}, "resources.cpu"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_invalid_specs_are_rejected_naming_the_field(api: LiveServer, change: dict[str, Any], field: str) -> None:
    with api.client() as client:
        response = client.post("/v1/jobs", json=tiny_spec(**change))
        assert response.status_code == 422, response.text
        assert response.headers["content-type"].startswith("application/problem+json")
        problem = response.json()
        assert problem["status"] == 422
        assert problem["title"]
        assert field in [e["field"] for e in problem["errors"]], problem
        assert client.get("/v1/jobs").json()["jobs"] == []  # nothing stored


def test_malformed_bodies_and_unknown_paths_get_problem_json(api: LiveServer) -> None:
    with api.client() as client:
        response = client.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"})
        assert response.status_code == 422
        assert response.json()["errors"]
        response = client.get("/v1/jobs/does-not-exist")
        assert response.status_code == 404
        assert response.json()["detail"] == "no job does-not-exist"
        assert client.get("/v1/jobs", params={"limit": 0}).json()["field"] == "limit"
        assert client.get("/v1/jobs", params={"cursor": "garbage!"}).json()["field"] == "cursor"
        assert client.get("/nowhere").headers["content-type"].startswith("application/problem+json")


def test_idempotency_key(api: LiveServer) -> None:
    with api.client() as client:
        first = client.post("/v1/jobs", json=tiny_spec(), headers={"Idempotency-Key": "k-1"})
        again = client.post("/v1/jobs", json=tiny_spec(), headers={"Idempotency-Key": "k-1"})
        assert first.status_code == again.status_code == 202
        assert first.json()["id"] == again.json()["id"]
        other = client.post("/v1/jobs", json=tiny_spec(epochs=3), headers={"Idempotency-Key": "k-1"})
        assert other.status_code == 422
        assert other.json()["field"] == "Idempotency-Key"
        assert first.json()["id"] in other.json()["detail"]
        fresh = client.post("/v1/jobs", json=tiny_spec(), headers={"Idempotency-Key": "k-2"})
        assert fresh.json()["id"] != first.json()["id"]
        assert [j["id"] for j in client.get("/v1/jobs").json()["jobs"]] == [fresh.json()["id"], first.json()["id"]]


def test_pagination_and_state_filter(api: LiveServer) -> None:
    with api.client() as client:
        ids = [client.post("/v1/jobs", json=tiny_spec(name=f"job {i}")).json()["id"] for i in range(7)]
        cancelled = client.post(f"/v1/jobs/{ids[2]}/cancel").json()
        assert cancelled["state"] == "cancelled"  # a queued job ends at once
        assert client.post(f"/v1/jobs/{ids[2]}/cancel").json()["state"] == "cancelled"  # idempotent
        seen, cursor, pages = [], None, 0
        while True:
            params: dict[str, Any] = {"limit": 3, **({"cursor": cursor} if cursor else {})}
            page = client.get("/v1/jobs", params=params).json()
            seen += [job["id"] for job in page["jobs"]]
            pages += 1
            assert pages <= len(ids), f"paging did not end after {pages} pages"
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == ids[::-1]
        assert pages == 3
        queued = client.get("/v1/jobs", params={"state": "queued"}).json()["jobs"]
        assert {job["id"] for job in queued} == set(ids) - {ids[2]}
        both = client.get("/v1/jobs", params=[("state", "queued"), ("state", "cancelled")]).json()["jobs"]
        assert len(both) == 7
        assert client.get("/v1/jobs", params={"state": "sleeping"}).json()["field"] == "state.0"


def test_event_stream_of_a_cancelled_queued_job(api: LiveServer) -> None:
    with api.client() as client:
        job = client.post("/v1/jobs", json=tiny_spec()).json()
        client.post(f"/v1/jobs/{job['id']}/cancel")
        with client.stream("GET", f"/v1/jobs/{job['id']}/events") as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = [line for line in response.iter_lines() if line.startswith("data:")]
        events = [json.loads(line.removeprefix("data:")) for line in lines]
        assert [e["data"]["state"] for e in events] == ["queued", "cancelled"]
        with client.stream("GET", f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": str(events[0]["id"])}) as r:
            resumed = [json.loads(line.removeprefix("data:")) for line in r.iter_lines() if line.startswith("data:")]
        assert [e["id"] for e in resumed] == [events[1]["id"]]
        assert client.get(f"/v1/jobs/{job['id']}/results").status_code == 409


def test_catalogue_and_health(api: LiveServer) -> None:
    with api.client() as client:
        workloads = {w["name"]: w for w in client.get("/v1/workloads").json()}
        assert workloads["digits-mlp"]["metric"] == "val_accuracy"
        assert workloads["digits-mlp"]["mode"] == "max"
        assert workloads["digits-mlp"]["config"]["hidden"] == 128
        optimizers = {o["name"]: o for o in client.get("/v1/optimizers").json()}
        assert {"koala-v", "koala-m", "sgd", "momentum", "adam", "adamw"} <= set(optimizers)
        sgd = {h["name"]: h for h in optimizers["sgd"]["hyperparameters"]}
        assert set(sgd) == {"lr", "momentum", "dampening", "nesterov", "weight_decay"}  # torch.optim.SGD's names
        assert (sgd["momentum"]["default"], sgd["momentum"]["type"], sgd["nesterov"]["type"]) == (0.0, "float", "bool")
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz").json()
        assert ready["database"] == "ok"
        assert ready["ray"].startswith("local")
        assert client.get("/openapi.json").json()["paths"]["/v1/jobs"]["post"]


# ---- auth ----------------------------------------------------------------------------------------------------------


def test_auth_matrix(server_factory: Factory) -> None:
    server = server_factory(run_scheduler="false", token_cache_seconds=0)
    store = Store(server.database_url)
    alice, bob = store.create_token("alice").token, store.create_token("bob").token
    store.close()
    with server.client() as anonymous, server.client("wrong") as wrong:
        for client in (anonymous, wrong):
            response = client.get("/v1/jobs")
            assert response.status_code == 401
            assert response.headers["www-authenticate"] == "Bearer"
            assert client.post("/v1/jobs", json=tiny_spec()).status_code == 401
        assert anonymous.get("/healthz").status_code == 200  # probes need no token
    with server.client(alice) as a, server.client(bob) as b:
        job = a.post("/v1/jobs", json=tiny_spec()).json()
        path = f"/v1/jobs/{job['id']}"
        assert a.get(path).status_code == 200
        for method, suffix in [("GET", ""), ("GET", "/trials"), ("GET", "/results"), ("GET", "/events"),
                               ("POST", "/cancel")]:  # fmt: skip
            assert b.request(method, path + suffix).status_code == 404, suffix
        assert b.get("/v1/jobs").json()["jobs"] == []
        assert [j["id"] for j in a.get("/v1/jobs").json()["jobs"]] == [job["id"]]
        assert a.get(path).json()["state"] == "queued"  # bob's cancel did nothing
        # Idempotency keys are per token: bob's identical key is a new job of his own.
        ka = a.post("/v1/jobs", json=tiny_spec(), headers={"Idempotency-Key": "same"}).json()
        kb = b.post("/v1/jobs", json=tiny_spec(), headers={"Idempotency-Key": "same"}).json()
        assert ka["id"] != kb["id"]


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
