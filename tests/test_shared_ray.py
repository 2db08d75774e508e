"""One Ray for all jobs: `koala serve` runs one local Ray head for its lifetime and every job's driver attaches to it.

Through a real server: concurrent jobs share the machine (their trials together never hold more CPUs than the head
has), a head that dies is restarted and its jobs resumed (not failed, the start not counted), a stopped service hands
its running jobs back and the next start resumes them, and with several API processes one of them owns the head."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from datetime import datetime
from typing import Any

import httpx
import pytest

from service.ray_head import head_directory, read_state
from service.testing import LiveServer
from tests.helpers import (
    ENDED,
    LONGER_DIGITS,
    Factory,
    assert_each_planned_trial_once,
    state_events,
    tiny_spec,
    wait_for,
    wait_until,
)

pytestmark = pytest.mark.slow
HEAD_STOPPED = "the service's Ray head stopped; resuming"


def head_of(server: LiveServer) -> Any:
    """The live head recorded under the server's data directory (waits for it)."""
    directory = head_directory(server.data_dir)
    wait_until(lambda: (info := read_state(directory)) is not None and info.process_alive(), 240, "no Ray head")
    return read_state(directory)


def max_overlap(intervals: list[tuple[datetime, datetime]]) -> int:
    """The most intervals that hold at one moment (an end before a start at the same instant)."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    most = current = 0
    for _, step in events:
        current += step
        most = max(most, current)
    return most


def test_max_overlap() -> None:
    t = [datetime.fromtimestamp(s) for s in range(10)]
    assert max_overlap([(t[0], t[2]), (t[1], t[3]), (t[2], t[4])]) == 2  # one ends as the next starts
    assert max_overlap([(t[0], t[5]), (t[1], t[3]), (t[2], t[4])]) == 3


def test_concurrent_jobs_share_the_machine(server_factory: Factory) -> None:
    """Two jobs of 2 concurrent trials each, run at once on a head of 2 CPUs: never more than 2 trials run."""
    server = server_factory(max_concurrent_jobs=2, max_running_jobs_per_owner=10, ray_num_cpus=2)
    spec = tiny_spec(
        epochs=4, seeds=4, workload_config=LONGER_DIGITS, optimizers=[{"name": "sgd", "params": {"lr": 0.1}}]
    )
    with server.client() as client:
        jobs = [client.post("/v1/jobs", json={**spec, "name": f"job {i}"}).json() for i in range(2)]
        done = [wait_for(client, job["id"], ENDED, timeout=400) for job in jobs]
        assert [d["state"] for d in done] == ["succeeded", "succeeded"], done
        trials = {job["id"]: client.get(f"/v1/jobs/{job['id']}/trials").json() for job in jobs}
        readiness = client.get("/readyz").json()
    assert readiness["ray"].startswith("local head at")
    # Both jobs ran at once (each started before the other ended) ...
    spans = [(datetime.fromisoformat(d["started_at"]), datetime.fromisoformat(d["finished_at"])) for d in done]
    assert spans[0][0] < spans[1][1]
    assert spans[1][0] < spans[0][1]
    # ... yet their trials, each holding one CPU from its start on a Ray worker to its end, never exceed the 2 CPUs.
    intervals = [
        (datetime.fromisoformat(t["started_at"]), datetime.fromisoformat(t["finished_at"]))
        for job_trials in trials.values()
        for t in job_trials
    ]
    assert len(intervals) == 8
    assert all(t["state"] == "complete" for job_trials in trials.values() for t in job_trials)
    assert max_overlap(intervals) == 2
    assert len({t["node"] for job_trials in trials.values() for t in job_trials}) == 1  # one Ray, one node


def test_a_dead_head_is_restarted_and_its_jobs_resumed(server_factory: Factory) -> None:
    server = server_factory(max_driver_starts=1)  # a start lost with the head must not count against the job
    spec = tiny_spec(epochs=15, seeds=2, workload_config=LONGER_DIGITS)
    with server.client() as client:
        job = client.post("/v1/jobs", json=spec).json()
        wait_for(client, job["id"], {"running"})
        wait_until(lambda: client.get(f"/v1/jobs/{job['id']}").json()["trials_done"] >= 2, 300, "no trial finished")
        dead = head_of(server)
        os.killpg(dead.pid, signal.SIGKILL)  # the head's `ray start` and its process group: GCS, raylet
        done = wait_for(client, job["id"], ENDED, timeout=400)
        assert done["state"] == "succeeded", done
        assert done["attempts"] == 1  # the start the head's death ended was handed back, not counted
        reasons = [e.get("reason") for e in state_events(client, job["id"]) if e["state"] == "queued"]
        assert HEAD_STOPPED in reasons
        assert all(t["state"] == "complete" for t in client.get(f"/v1/jobs/{job['id']}/trials").json())
    restarted = head_of(server)
    assert restarted.pid != dead.pid
    assert not os.path.exists(dead.temp_dir)  # the dead head's processes and files were cleaned up
    assert_each_planned_trial_once(server.database_url, job["id"], spec)
    assert "died; restarting it" in server.log_text()


def test_a_stopped_service_hands_its_jobs_back_and_resumes_them(server_factory: Factory) -> None:
    server = server_factory()
    spec = tiny_spec(epochs=15, seeds=2, workload_config=LONGER_DIGITS)
    with server.client() as client:
        job = client.post("/v1/jobs", json=spec).json()
        wait_until(lambda: client.get(f"/v1/jobs/{job['id']}").json()["trials_done"] >= 1, 300, "no trial finished")
    head = head_of(server)
    server.stop()  # Ctrl-C: the service stops its Ray head with it
    wait_until(lambda: not head.process_alive(), 30, "the head outlived the service")
    wait_until(lambda: job_state(server, job["id"]) == "queued", 60, "the job was not handed back")
    server.start()
    with server.client() as client:
        done = wait_for(client, job["id"], ENDED, timeout=400)
        assert done["state"] == "succeeded", done
        assert done["attempts"] == 1
    assert_each_planned_trial_once(server.database_url, job["id"], spec)


def job_state(server: LiveServer, job_id: str) -> str:
    from service.store import Store

    store = Store(server.database_url)
    try:
        job = store.get_job(job_id)
        assert job is not None
        return job.state
    finally:
        store.close()


def descendants(pid: int) -> set[int]:
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    found = {int(child) for child in children}
    for child in list(found):
        found |= descendants(child)
    return found


def cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            return file.read()
    except OSError:
        return b""


def test_one_head_for_several_api_processes(server_factory: Factory) -> None:
    server = server_factory(workers=2)
    assert server.process is not None
    head = head_of(server)
    time.sleep(3)  # every API process has had several scheduler periods to start one of its own
    heads = [pid for pid in descendants(server.process.pid) if b"ray.scripts.scripts\0start" in cmdline(pid)]
    assert heads == [head.pid]
    with httpx.Client(base_url=server.url, timeout=30) as client:
        job = client.post("/v1/jobs", json=tiny_spec(epochs=1, seeds=1)).json()
        assert wait_for(client, job["id"], ENDED)["state"] == "succeeded"
    state = json.loads((head_directory(server.data_dir) / "head.json").read_text())
    assert state["pid"] == head.pid
