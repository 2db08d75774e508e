"""Helpers shared by the test files: small job specs, waits with a deadline, what a job left in the database and in
its event stream, and `koala` commands against a LiveServer. Test files import them from here, never from one
another; the processes themselves (LiveServer, LoopbackCluster, ...) are in service.testing."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import optuna

from service.recorder import job_study_names, storage_for
from service.store import Store
from service.testing import LiveServer, server_environment

# `server_factory(**settings)` (tests/conftest.py): starts a LiveServer on a fresh data directory.
Factory = Callable[..., LiveServer]

ENDED = {"succeeded", "failed", "cancelled"}

TINY_DIGITS = {"batch_size": 32, "hidden": 16, "limit_train": 256}
# Long enough (a few seconds per trial) that a job is still running when a test interrupts it.
LONGER_DIGITS = {**TINY_DIGITS, "limit_train": 1024}


def tiny_spec(**changes: Any) -> dict[str, Any]:
    """A job of 8 trials that takes seconds: three optimizers (one tuned with 2 trials) on a small digits MLP, 2
    epochs, 2 seeds; `changes` replace top-level fields."""
    spec: dict[str, Any] = {
        "name": "tiny digits",
        "workload": "digits-mlp",
        "workload_config": TINY_DIGITS,
        "epochs": 2,
        "seeds": 2,
        "max_concurrent_trials": 2,
        "optimizers": [
            {"name": "koala-v"},
            {"name": "sgd", "params": {"lr": 0.1}},
            {"name": "adam", "search": {"lr": {"low": 1e-3, "high": 1e-1, "log": True}}, "trials": 2},
        ],
    }
    spec.update(changes)
    return spec


# ---- waiting ----------------------------------------------------------------------------------------------------


def wait_until(condition: Callable[[], object], timeout: float, message: str, interval: float = 0.2) -> None:
    """Poll `condition` until it is true; AssertionError with `message` (what was waited for) after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{message} (waited {timeout} s)"
        time.sleep(interval)


def wait_for(client: httpx.Client, job_id: str, states: set[str], timeout: float = 240) -> dict[str, Any]:
    """The job, once its state is one of `states`; AssertionError naming its last state after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        assert time.monotonic() < deadline, (
            f"job {job_id} still {job['state']}, not {sorted(states)}, after {timeout} s"
        )
        time.sleep(0.3)


# ---- what a job left behind -------------------------------------------------------------------------------------


def studies_trials(database_url: str, job_id: str) -> dict[str, list[optuna.trial.FrozenTrial]]:
    """The job's Optuna trials, by optimizer name."""
    storage = storage_for(database_url)
    try:
        return {
            name.split("/", 1)[1]: optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
            for name in job_study_names(storage, job_id)
        }
    finally:
        storage.engine.dispose()  # type: ignore[attr-defined]  # (an RDBStorage) no pooled connection outlives it


def assert_each_planned_trial_once(database_url: str, job_id: str, spec: dict[str, Any]) -> None:
    """Every planned (optimizer, phase, seed) slot appears exactly once, and nothing is left RUNNING."""
    trials = studies_trials(database_url, job_id)
    seeds = spec["seeds"]
    for entry in spec["optimizers"]:
        found = trials[entry["name"]]
        assert not [t for t in found if t.state == optuna.trial.TrialState.RUNNING]
        # Trials without a phase were asked by a driver killed before it attributed them: closed, never run.
        orphans = [t for t in found if "phase" not in t.user_attrs]
        assert all(t.user_attrs["reason"] == "interrupted before it started" for t in orphans)
        slots = Counter((t.user_attrs["phase"], t.user_attrs["seed"]) for t in found if t not in orphans)
        expected = Counter({("eval", seed): 1 for seed in range(seeds)})
        if "trials" in entry:
            expected[("tune", 0)] = entry["trials"]
        assert slots == expected, entry["name"]


def driver_pid(server: LiveServer, job_id: str) -> int:
    """The pid of the job's current driver, as the database records it."""
    store = Store(server.database_url)
    try:
        job = store.get_job(job_id)
        assert job is not None
        assert job.driver_pid is not None
        return job.driver_pid
    finally:
        store.close()


def state_events(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    """The data of the job's `state` events, oldest first."""
    text = client.get(f"/v1/jobs/{job_id}/events").text
    events = [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:")]
    return [e["data"] for e in events if e["kind"] == "state"]


# ---- servers and the command line -------------------------------------------------------------------------------


def start_server(root: Path, name: str, **settings: str) -> LiveServer:
    """A `koala serve` on loopback with its own data directory, run from `root/name/cwd` (the scheduler is off
    unless asked for, and tokens are checked afresh on every request: these tests look at what the API accepts)."""
    data_dir = root / name
    cwd = data_dir / "cwd"
    cwd.mkdir(parents=True)
    settings = {"run_scheduler": "false", "token_cache_seconds": "0", **settings}
    return LiveServer(data_dir, server_environment(data_dir, None, None, **settings), cwd=cwd).start()


def koala_cli(
    server: LiveServer, *args: str, token: str | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`koala ARGS` against the server (and its database), with `token` as KOALA_TOKEN (default: none)."""
    env = {**server.env, "KOALA_URL": server.url}
    env.pop("KOALA_TOKEN", None)
    if token is not None:
        env["KOALA_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "koala_client.cli", *args], env=env, capture_output=True, text=True, timeout=300, cwd=cwd
    )


def create_token(server: LiveServer, *args: str) -> str:
    """`koala token create ARGS` against the server's database; returns the token."""
    result = koala_cli(server, "token", "create", *args)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()
