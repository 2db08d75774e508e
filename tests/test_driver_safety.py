"""A job driver on a shared cluster: never doubled (fencing), patient with a busy database, bounded in time, honest
about failed trials, tidy on disk, immune to files where the server was started, and fair between owners.

The service cases run a real `koala serve` (its drivers on a real local Ray each) or `koala run`; the scheduler and
retry cases use the scheduler, the store and the recorder directly on SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy as sa
import yaml
from optuna.trial import TrialState

from service.guarded_storage import GuardedStorage
from service.jobspec import JobSpec
from service.recorder import Recorder, job_study_names, storage_for
from service.retry import DatabaseUnavailableError, is_transient, retry
from service.scheduler import Scheduler
from service.settings import Settings
from service.store import FencedError, Store
from service.testing import LiveServer
from tests.helpers import (
    ENDED,
    LONGER_DIGITS,
    Factory,
    assert_each_planned_trial_once,
    create_token,
    driver_pid,
    state_events,
    studies_trials,
    tiny_spec,
    wait_for,
    wait_until,
)

pytest_slow = pytest.mark.slow


def job_row(server: LiveServer, job_id: str) -> Any:
    store = Store(server.database_url)
    try:
        return store.get_job(job_id)
    finally:
        store.close()


def process_gone(pid: int) -> bool:
    """Whether `pid` has exited (a zombie waiting for its parent counts as exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def scratch_paths(server: LiveServer, job_id: str) -> list[Path]:
    return [server.data_dir / "tune" / job_id, server.data_dir / "drivers" / job_id]


# ---- 1. fencing: a paused driver taken for dead never doubles its replacement -----------------------------------


def start_and_pause(server: LiveServer, spec: dict[str, Any]) -> tuple[str, int]:
    """Submit `spec`, wait until a trial has finished, and SIGSTOP the job's driver: alive, but silent. Returns the
    job id and the paused driver's pid."""
    with server.client() as client:
        job = client.post("/v1/jobs", json=spec).json()
        wait_for(client, job["id"], {"running"})
        wait_until(lambda: client.get(f"/v1/jobs/{job['id']}").json()["trials_done"] >= 1, 240, "no trial finished")
    pid = driver_pid(server, job["id"])
    os.kill(pid, signal.SIGSTOP)
    return job["id"], pid


def wait_for_replacement(server: LiveServer, job_id: str, old: int) -> None:
    wait_until(lambda: job_row(server, job_id).generation == 2, 90, "the paused driver was not replaced")
    wait_until(lambda: job_row(server, job_id).driver_pid not in (None, old), 30, "no new driver")


def release(pid: int) -> None:
    """Resume `pid` if it is still there, and kill it (with its process group) if it does not exit on its own."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGCONT)
    if not process_gone(pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


def assert_resumed_once(server: LiveServer, job_id: str, spec: dict[str, Any]) -> None:
    with server.client() as client:
        done = wait_for(client, job_id, ENDED)
        assert done["state"] == "succeeded", done
        assert done["attempts"] == 2
        assert done["trials_done"] == done["trials_total"] == 8
        trials = client.get(f"/v1/jobs/{job_id}/trials").json()
        assert all(t["state"] == "complete" for t in trials)
        reasons = [e.get("reason", "") for e in state_events(client, job_id) if e["state"] == "queued"]
        assert any("stopped answering" in reason for reason in reasons), reasons
    assert_each_planned_trial_once(server.database_url, job_id, spec)


@pytest_slow
def test_a_paused_driver_on_this_host_is_replaced_and_killed(server_factory: Factory) -> None:
    """Its scheduler takes a silent driver for dead even though the process exists, replaces it, and kills it (a
    paused process may hold SQLite's lock, and it holds the machine's resources)."""
    server = server_factory(stale_seconds=5, heartbeat_seconds=1)
    spec = tiny_spec(epochs=15, seeds=2, workload_config=LONGER_DIGITS)
    job_id, old = start_and_pause(server, spec)
    try:
        wait_for_replacement(server, job_id, old)
        wait_until(lambda: process_gone(old), 30, "the silent driver was not stopped")
    finally:
        release(old)
    assert_resumed_once(server, job_id, spec)
    assert f"killed its silent driver (pid {old})" in server.log_text()


@pytest_slow
@pytest.mark.postgres
def test_a_paused_driver_elsewhere_is_fenced_off_when_it_resumes(postgres_url: str, server_factory: Factory) -> None:
    """A driver the scheduler cannot reach (another host: here the API restarts and the job's row names another
    host) is replaced once silent; when it resumes, its first write is refused and it exits without touching the job
    or its trials."""
    server = server_factory(database_url=postgres_url, stale_seconds=5, heartbeat_seconds=1)
    spec = tiny_spec(epochs=15, seeds=2, workload_config=LONGER_DIGITS)
    job_id, old = start_and_pause(server, spec)
    try:
        server.kill()
        store = Store(server.database_url)
        with store.engine.begin() as db:
            db.execute(sa.text("UPDATE koala_jobs SET driver_host = 'another-host' WHERE id = :id"), {"id": job_id})
        store.close()
        server.start()
        wait_for_replacement(server, job_id, old)
        time.sleep(3)  # the new driver is at work on the job's trials
        assert not process_gone(old)  # out of the scheduler's reach: only fencing stops it
        os.kill(old, signal.SIGCONT)
        wait_until(lambda: process_gone(old), 60, "the old driver did not stop after its writes were refused")
    finally:
        release(old)
    assert_resumed_once(server, job_id, spec)
    log = (server.data_dir / "logs" / f"{job_id}.log").read_text()
    assert f"job {job_id} is no longer this driver's (generation 1): now generation 2" in log


def test_a_drivers_writes_are_conditional_on_its_generation(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'koala.db'}"
    store = Store(url)
    store.migrate()
    spec = JobSpec.parse({"workload": "digits-mlp", "seeds": 1, "optimizers": [{"name": "sgd"}]})
    job, _ = store.create_job(spec.model_dump(), name="j", workload="digits-mlp", progress={})
    first = store.claim(job.id, "h")
    assert first == 1
    assert store.heartbeat(job.id, first) == "running"
    fence_calls = []

    def fence() -> None:
        fence_calls.append(1)
        store.check_driver(job.id, 1)

    recorder = Recorder(storage_for(url), job.id, spec, fence=fence)
    opened = recorder.open(spec.optimizers[0], "eval", 0, {})
    assert fence_calls

    # The first driver is taken for dead and the job started again: the new start takes generation 2.
    assert store.requeue(job.id, "its driver died; resuming", generation=1)
    assert store.claim(job.id, "h") == 2
    assert store.heartbeat(job.id, 2) == "running"
    with pytest.raises(FencedError):
        store.heartbeat(job.id, 1)
    with pytest.raises(FencedError):
        store.set_progress(job.id, {"sgd": {"done": 1, "total": 1}}, generation=1)
    with pytest.raises(FencedError):
        store.add_event(job.id, "trial", {"state": "running"}, generation=1)
    assert not store.finish(job.id, "succeeded", generation=1)
    assert not store.requeue(job.id, "a stale view", generation=1)  # a reconciler that saw generation 1
    with pytest.raises(FencedError):
        Recorder.report(opened, 1, 0.5)
    with pytest.raises(FencedError):
        Recorder.close(opened, TrialState.COMPLETE, value=0.5)
    with pytest.raises(FencedError):
        recorder.open(spec.optimizers[0], "eval", 0, {})
    (trial,) = recorder.study("sgd").get_trials()
    assert trial.state == TrialState.RUNNING  # untouched: the new driver adopts it
    assert trial.intermediate_values == {}
    current = store.get_job(job.id)
    assert current is not None
    assert (current.state, current.generation, current.progress) == ("running", 2, {})
    assert store.finish(job.id, "succeeded", generation=2)
    store.close()


# ---- 2. a busy database: bounded retries, then a clear reason ----------------------------------------------------


@contextlib.contextmanager
def locked(database: Path, seconds: float) -> Iterator[None]:
    """Hold SQLite's exclusive lock on `database` from another connection for `seconds` (in the background)."""
    holder = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    released = threading.Timer(seconds, lambda: holder.execute("COMMIT"))
    released.start()
    try:
        yield
    finally:
        released.join()
        holder.close()


def short_timeout_engine(database: Path) -> sa.engine.Engine:
    return sa.create_engine(f"sqlite:///{database}", connect_args={"timeout": 0.05})


def test_retry_waits_out_a_locked_sqlite_database(tmp_path: Path) -> None:
    database = tmp_path / "busy.db"
    engine = short_timeout_engine(database)
    with engine.begin() as db:
        db.exec_driver_sql("CREATE TABLE acknowledged (n INTEGER)")
    attempts = 0

    def write() -> None:
        nonlocal attempts
        attempts += 1
        with engine.begin() as db:
            db.exec_driver_sql("INSERT INTO acknowledged VALUES (1)")

    with locked(database, 1.5):
        started = time.monotonic()
        retry(write, what="an acknowledged write", budget=30)
        assert time.monotonic() - started >= 1.0
    assert attempts > 1
    with engine.connect() as db:
        assert db.exec_driver_sql("SELECT count(*) FROM acknowledged").scalar() == 1


def test_retry_gives_up_with_a_clear_reason_and_lets_other_errors_through(tmp_path: Path) -> None:
    database = tmp_path / "busy.db"
    engine = short_timeout_engine(database)
    with engine.begin() as db:
        db.exec_driver_sql("CREATE TABLE t (n INTEGER PRIMARY KEY)")
        db.exec_driver_sql("INSERT INTO t VALUES (1)")

    def insert(n: int) -> None:
        with engine.begin() as db:
            db.exec_driver_sql(f"INSERT INTO t VALUES ({n})")

    with locked(database, 3.0), pytest.raises(DatabaseUnavailableError) as gave_up:
        retry(lambda: insert(2), what="recording a trial", budget=1.0)
    message = str(gave_up.value)
    assert "recording a trial" in message
    assert "database is locked" in message
    assert is_transient(gave_up.value.__cause__)  # type: ignore[arg-type]

    calls = 0

    def duplicate() -> None:
        nonlocal calls
        calls += 1
        insert(1)

    with pytest.raises(sa.exc.IntegrityError):
        retry(duplicate, what="a duplicate", budget=30)
    assert calls == 1  # not transient: raised at once


def test_the_drivers_writes_survive_a_locked_database(tmp_path: Path) -> None:
    """Our tables (heartbeat, progress, events) and the Optuna studies, written while another connection holds
    SQLite's exclusive lock for longer than the connections' busy timeout."""
    database = tmp_path / "koala.db"
    url = f"sqlite:///{database}"
    store = Store(url)
    store.migrate()
    store.engine = short_timeout_engine(database)  # fail fast on the lock instead of waiting in SQLite
    spec = JobSpec.parse({"workload": "digits-mlp", "seeds": 1, "optimizers": [{"name": "sgd"}]})
    job, _ = store.create_job(spec.model_dump(), name="j", workload="digits-mlp", progress={})
    generation = store.claim(job.id, "h")
    assert generation is not None
    inner = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 0.05}})
    storage = GuardedStorage(optuna.storages.get_storage(inner), lambda: store.check_driver(job.id, generation))
    recorder = Recorder(storage, job.id, spec)
    opened = recorder.open(spec.optimizers[0], "eval", 0, {})

    def write(call: Any) -> Any:
        return retry(call, what="a driver write", budget=30)

    with locked(database, 1.5):
        assert write(lambda: store.heartbeat(job.id, generation)) == "running"
    with locked(database, 1.5):
        write(lambda: store.set_progress(job.id, {"sgd": {"done": 1, "total": 1}}, generation=generation))
        write(lambda: store.add_event(job.id, "epoch", {"epoch": 1}, generation=generation))
    with locked(database, 1.5):
        Recorder.report(opened, 1, 0.75)
        Recorder.close(opened, TrialState.COMPLETE, value=0.75, attrs={"wall_seconds": 1.0})
    (trial,) = recorder.study("sgd").get_trials()
    assert (trial.state, trial.value, trial.intermediate_values) == (TrialState.COMPLETE, 0.75, {1: 0.75})
    current = store.get_job(job.id)
    assert current is not None
    assert current.progress == {"sgd": {"done": 1, "total": 1}}
    assert [e.kind for e in store.events_after(job.id)][-1] == "epoch"
    store.close()
    inner.engine.dispose()


# ---- 3, 4, 5: time limits, failed trials, scratch -----------------------------------------------------------------


@pytest_slow
def test_a_trial_past_its_time_limit_fails_and_so_does_a_job_of_such_trials(server_factory: Factory) -> None:
    server = server_factory(max_trial_seconds=3)
    # Each trial needs about 20 s (200 epochs of the full digits MLP, reported one by one): stopped at a report.
    epochs = tiny_spec(epochs=200, seeds=2, workload_config={}, optimizers=[{"name": "sgd", "params": {"lr": 0.05}}])
    # Each epoch takes several seconds: stopped in the middle of its first epoch, before it reported anything.
    stuck = tiny_spec(
        workload="noisy-quadratic",
        workload_config={"dimension": 20, "samples_per_epoch": 400_000},
        epochs=3,
        seeds=1,
        optimizers=[{"name": "sgd", "params": {"lr": 0.01}}],
    )
    with server.client() as client:
        jobs = [client.post("/v1/jobs", json=spec).json() for spec in (epochs, stuck)]
        for job, count in zip(jobs, (2, 1), strict=True):
            done = wait_for(client, job["id"], ENDED, timeout=180)
            assert done["state"] == "failed", done
            assert done["error"] == f"every trial failed ({count}: time limit {count})"
            trials = client.get(f"/v1/jobs/{job['id']}/trials").json()
            assert [(t["state"], t["reason"]) for t in trials] == [("fail", "time limit")] * count
            assert all(t["wall_seconds"] > 0 for t in trials)  # the time it spent counts as compute
            report = client.get(f"/v1/jobs/{job['id']}/results").json()
            assert sorted((f["optimizer"], f["phase"], f["seed"], f["reason"]) for f in report["failed_trials"]) == [
                ("sgd", "eval", seed, "time limit") for seed in range(count)
            ]
        assert all(t["epochs_done"] < 200 for t in client.get(f"/v1/jobs/{jobs[0]['id']}/trials").json())
        (stopped,) = client.get(f"/v1/jobs/{jobs[1]['id']}/trials").json()
        assert (stopped["epochs_done"], stopped["wall_seconds"] >= 3) == (0, True)
    for job in jobs:
        wait_until(lambda job=job: not any(p.exists() for p in scratch_paths(server, job["id"])), 15, "scratch left")


@pytest_slow
def test_a_job_past_its_time_limit_fails_and_its_scratch_is_kept_then_removed(server_factory: Factory) -> None:
    server = server_factory(max_job_seconds=20, keep_scratch_seconds=6)
    spec = tiny_spec(
        epochs=200,
        seeds=3,
        max_concurrent_trials=1,
        workload_config={},
        optimizers=[{"name": "sgd", "params": {"lr": 0.05}}],
    )
    with server.client() as client:
        job = client.post("/v1/jobs", json=spec).json()
        done = wait_for(client, job["id"], ENDED, timeout=180)
        assert done["state"] == "failed", done
        assert done["error"].startswith("job time limit of 20 s reached")
        kept = [p.exists() for p in scratch_paths(server, job["id"])]
        trials = client.get(f"/v1/jobs/{job['id']}/trials").json()
    assert trials
    assert not [t for t in trials if t["state"] == "running"]
    assert any(t["reason"] == "job time limit" for t in trials)
    assert all(t["reason"] == "job time limit" for t in trials if t["state"] != "complete")
    assert kept == [True, True]  # keep_scratch_seconds: still there just after the end ...
    wait_until(lambda: not any(p.exists() for p in scratch_paths(server, job["id"])), 30, "scratch never removed")


@pytest_slow
def test_failed_trials_fail_the_job_only_when_none_completed(server_factory: Factory) -> None:
    server = server_factory()
    diverging = {"name": "sgd", "params": {"lr": 1e4}}
    all_fail = tiny_spec(name="all diverge", seeds=2, optimizers=[diverging])
    some_fail = tiny_spec(name="some diverge", seeds=2, optimizers=[{"name": "koala-v"}, diverging])
    long = tiny_spec(name="cancelled", epochs=200, seeds=1, optimizers=[{"name": "sgd", "params": {"lr": 0.05}}])
    with server.client() as client:
        failed = client.post("/v1/jobs", json=all_fail).json()
        mixed = client.post("/v1/jobs", json=some_fail).json()
        done = wait_for(client, failed["id"], ENDED)
        assert done["state"] == "failed", done
        assert done["error"] == "every trial failed (2: diverged 2)"
        report = client.get(f"/v1/jobs/{failed['id']}/results").json()
        assert [f["reason"] for f in report["failed_trials"]] == ["diverged", "diverged"]

        done = wait_for(client, mixed["id"], ENDED)
        assert done["state"] == "succeeded", done
        assert done["error"] is None
        report = client.get(f"/v1/jobs/{mixed['id']}/results").json()
        assert report["ranking"] == ["koala-v"]
        trials = {(t["optimizer"], t["seed"]): t for t in client.get(f"/v1/jobs/{mixed['id']}/trials").json()}
        assert sorted(
            (f["optimizer"], f["phase"], f["seed"], f["number"], f["reason"]) for f in report["failed_trials"]
        ) == [("sgd", "eval", seed, trials[("sgd", seed)]["number"], "diverged") for seed in (0, 1)]

        cancelled = client.post("/v1/jobs", json=long).json()
        wait_until(
            lambda: any(t["epochs_done"] >= 1 for t in client.get(f"/v1/jobs/{cancelled['id']}/trials").json()),
            120,
            "no trial reached its first epoch",
        )
        client.post(f"/v1/jobs/{cancelled['id']}/cancel")
        assert wait_for(client, cancelled["id"], ENDED, timeout=60)["state"] == "cancelled"
    for job in (failed, mixed, cancelled):  # nothing of an ended job is left on disk (keep_scratch_seconds is 0)
        wait_until(lambda job=job: not any(p.exists() for p in scratch_paths(server, job["id"])), 15, job["name"])


def koala_run_spec(tmp_path: Path, **changes: Any) -> Path:
    spec = {
        "workload": "digits-mlp",
        "epochs": 200,
        "seeds": 3,
        "max_concurrent_trials": 1,
        "optimizers": [{"name": "sgd", "params": {"lr": 0.05}}],
        **changes,
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest_slow
def test_koala_run_honours_the_specs_time_limits(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KOALA_", "RAY_ADDRESS"))}
    env["KOALA_DATA_DIR"] = str(tmp_path / "data")
    database = tmp_path / "runs.db"
    for job_id, limits in [("trials", {"trial_time_limit_s": 2}), ("job", {"job_time_limit_s": 25})]:
        spec_file = koala_run_spec(tmp_path, seeds=2 if job_id == "trials" else 3, **limits)
        command = [sys.executable, "-m", "koala_client.cli", "run", str(spec_file), "--db", f"sqlite:///{database}"]
        command += ["--job-id", job_id, "--out", str(tmp_path / job_id)]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 1, result.stdout + result.stderr
        trials = studies_trials(f"sqlite:///{database}", job_id)["sgd"]
        assert trials
        assert not [t for t in trials if t.state == TrialState.RUNNING]
        report = json.loads((tmp_path / job_id / "report.json").read_text())
        if job_id == "trials":
            assert "every trial failed (2: time limit 2)" in " ".join(result.stderr.split())
            assert [f["reason"] for f in report["failed_trials"]] == ["time limit", "time limit"]
        else:
            assert "job time limit of 25 s reached" in " ".join(result.stderr.split())
            assert any(t.user_attrs["reason"] == "job time limit" for t in trials)


# ---- 6. the driver's working directory ----------------------------------------------------------------------------


@pytest_slow
def test_files_in_the_servers_working_directory_do_not_shadow_the_drivers_modules(
    server_factory: Factory, tmp_path: Path
) -> None:
    workdir = tmp_path / "where-the-server-was-started"
    workdir.mkdir()
    # The API process never imports Ray; its drivers do, first thing.
    (workdir / "ray.py").write_text("raise ImportError('ray.py in the server\\'s working directory was imported')\n")
    server = server_factory(cwd=workdir)
    spec = tiny_spec(epochs=1, seeds=1, optimizers=[{"name": "sgd", "params": {"lr": 0.1}}])
    with server.client() as client:
        job = client.post("/v1/jobs", json=spec).json()
        done = wait_for(client, job["id"], ENDED)
    log = (server.data_dir / "logs" / f"{job['id']}.log").read_text()
    assert "working directory was imported" not in log
    assert done["state"] == "succeeded", (done, log[-3000:])
    assert done["attempts"] == 1
    assert list(workdir.iterdir()) == [workdir / "ray.py"]  # nothing written where the server was started


# ---- 7. fairness between owners, and the cap across schedulers -------------------------------------------------


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'koala.db'}"
    return str(request.getfixturevalue("postgres_url"))


class RecordingScheduler(Scheduler):
    """The real scheduler, except that a start is recorded instead of spawning a driver process."""

    def __init__(self, store: Store, settings: Settings) -> None:
        super().__init__(store, storage_for(settings.database_url), settings)
        self.started: list[tuple[str, int]] = []

    def _spawn(self, job_id: str, generation: int) -> None:
        self.started.append((job_id, generation))


def settings_for(database_url: str, tmp_path: Path, **values: Any) -> Settings:
    return Settings(data_dir=tmp_path / "data", database_url=database_url, **values)


def new_job(store: Store, name: str, owner: str | None) -> str:
    job, _ = store.create_job({"name": name}, name=name, workload="digits-mlp", progress={}, owner=owner)
    return job.id


def test_owners_take_turns(database_url: str, tmp_path: Path) -> None:
    store = Store(database_url)
    store.migrate()
    try:
        names: dict[str, str] = {}
        for name, owner in [("a1", "alice"), ("a2", "alice"), ("a3", "alice"), ("b1", "bob"), ("n1", None)]:
            names[new_job(store, name, owner)] = name
        scheduler = RecordingScheduler(store, settings_for(database_url, tmp_path, max_concurrent_jobs=1))
        order: list[str] = []
        for _ in range(5):
            scheduler.tick()
            assert len(scheduler.started) == len(order) + 1  # one at a time: the cap is 1
            job_id, generation = scheduler.started[-1]
            order.append(names[job_id])
            assert store.finish(job_id, "succeeded", generation=generation)
        # Alice queued three jobs first, yet Bob's and the ownerless job start before her second.
        assert order == ["a1", "b1", "n1", "a2", "a3"]

        # An owner at its own cap waits while others go ahead (ownerless jobs have none but the global one).
        first, second, other = new_job(store, "a4", "alice"), new_job(store, "a5", "alice"), new_job(store, "b2", "bob")
        assert store.claim_next("h", 10, max_active_per_owner=1) == (other, 1)  # Bob's last start is older
        assert store.claim_next("h", 10, max_active_per_owner=1) == (first, 1)
        assert store.claim_next("h", 10, max_active_per_owner=1) is None  # both at their cap
        assert store.claim_next("h", 10, max_active_per_owner=2) == (second, 1)
        scheduler.storage.engine.dispose()  # type: ignore[attr-defined]
    finally:
        store.close()


def test_the_cap_holds_with_schedulers_racing_in_several_processes(database_url: str, tmp_path: Path) -> None:
    cap = 2
    stores = [Store(database_url) for _ in range(3)]  # three API processes
    stores[0].migrate()
    settings = settings_for(database_url, tmp_path, max_concurrent_jobs=cap)
    schedulers = [RecordingScheduler(store, settings) for store in stores]
    for i, scheduler in enumerate(schedulers):
        scheduler.host = f"host-{i}"
    try:
        for _ in range(9):
            new_job(stores[0], "job", None)
        for _ in range(4):  # rounds: all start queued jobs at the same moment, then the running ones end
            queued = len(stores[0].jobs_in(["queued"]))
            barrier = threading.Barrier(len(schedulers))

            def start(scheduler: RecordingScheduler, barrier: threading.Barrier = barrier) -> None:
                barrier.wait()
                scheduler._start_queued()

            threads = [threading.Thread(target=start, args=(s,)) for s in schedulers]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            running = stores[0].jobs_in(["running", "cancelling"])
            assert len(running) == min(cap, queued)
            for job in running:
                assert stores[0].finish(job.id, "succeeded", generation=job.generation)
        started = [entry for s in schedulers for entry in s.started]
        assert len(started) == len({job_id for job_id, _ in started}) == 8  # each job started once
    finally:
        for scheduler in schedulers:
            scheduler.storage.engine.dispose()  # type: ignore[attr-defined]
        for store in stores:
            store.close()


def test_a_recorders_storage_is_guarded_once(database_url: str) -> None:
    """A Recorder wraps its storage in the guard (retries, fence) once: a guarded storage is used as it is."""
    spec = JobSpec.parse({"workload": "digits-mlp", "seeds": 1, "optimizers": [{"name": "sgd"}]})
    storage = storage_for(database_url)
    recorder = Recorder(storage, "wrap", spec)
    again = Recorder(recorder.storage, "wrap", spec)
    assert again.storage is recorder.storage
    assert job_study_names(recorder.storage, "wrap") == ["job-wrap/sgd"]
    storage.engine.dispose()  # type: ignore[attr-defined]


# ---- 8. time is the database's: a driver host's skewed clock changes nothing -------------------------------------

# A sitecustomize.py for the server's PYTHONPATH (its drivers inherit it): in a job driver, Python's clock runs
# SKEW_DRIVER_SECONDS off (time.time, time.time_ns, datetime.now/utcnow/today), in `koala serve` SKEW_SERVER_SECONDS
# off; other processes (Ray, the test) keep the host's. A host whose clock is hours off cannot be had without root.
CLOCK_SHIM = """
import datetime as _dt
import importlib.abc
import importlib.util
import os
import sys
import time as _time


def _offset():
    try:
        with open("/proc/self/cmdline", "rb") as f:
            argv = f.read().split(bytes(1))
    except OSError:
        return 0.0
    if b"service.worker" in argv:
        return float(os.environ.get("SKEW_DRIVER_SECONDS", "0"))
    if b"koala_client.cli" in argv and b"serve" in argv:
        return float(os.environ.get("SKEW_SERVER_SECONDS", "0"))
    return 0.0


OFFSET = _offset()
_Real = _dt.datetime


class _Meta(type):
    def __instancecheck__(cls, obj):
        return isinstance(obj, _Real)

    def __subclasscheck__(cls, sub):
        return issubclass(sub, _Real)


class SkewedDatetime(_Real, metaclass=_Meta):
    __slots__ = ()

    @classmethod
    def now(cls, tz=None):
        return _Real.now(tz) + _dt.timedelta(seconds=OFFSET)

    @classmethod
    def utcnow(cls):
        return _Real.utcnow() + _dt.timedelta(seconds=OFFSET)

    @classmethod
    def today(cls):
        return cls.now()


class _DatetimeModule:
    def __getattr__(self, name):
        return SkewedDatetime if name == "datetime" else getattr(_dt, name)


class _Skewing(importlib.abc.MetaPathFinder):
    # The service's own modules see SkewedDatetime as `datetime` (from datetime import datetime, import datetime).
    # Replacing datetime.datetime for everyone would break extension modules that subclass it (pandas' Timestamp).

    def find_spec(self, name, path, target=None):
        if name.split(".")[0] not in ("service", "koala", "koala_client"):
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            for key, value in list(vars(module).items()):
                if value is _Real:
                    setattr(module, key, SkewedDatetime)
                elif value is _dt:
                    setattr(module, key, _DatetimeModule())

        spec.loader.exec_module = exec_module
        return spec


if OFFSET:
    _time_time, _time_ns = _time.time, _time.time_ns
    _time.time = lambda: _time_time() + OFFSET
    _time.time_ns = lambda: _time_ns() + int(OFFSET * 1e9)
    sys.meta_path.insert(0, _Skewing())
    print(f"clock shim: this process's clock is {OFFSET:+.0f} s off (pid {os.getpid()})", file=sys.stderr, flush=True)
"""


@pytest_slow
def test_a_drivers_skewed_clock_neither_kills_it_nor_dates_its_heartbeats(
    server_factory: Factory, tmp_path: Path
) -> None:
    """Heartbeats are written, and staleness judged, by the database's clock: a driver whose host clock is 3 hours
    behind (and a scheduler whose clock is 1 hour ahead) keeps its job, with heartbeats at the database's now. Were
    either written or judged by Python's clock, the driver would be taken for dead within `stale_seconds` and
    replaced, and its heartbeats would be hours off."""
    shim = tmp_path / "clock-shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(CLOCK_SHIM)
    pythonpath = os.pathsep.join(p for p in [str(shim), os.environ.get("PYTHONPATH", "")] if p)
    skew = {"PYTHONPATH": pythonpath, "SKEW_DRIVER_SECONDS": str(-3 * 3600), "SKEW_SERVER_SECONDS": str(3600)}
    server = server_factory(env=skew, stale_seconds=6, heartbeat_seconds=1)
    spec = tiny_spec(epochs=10, seeds=2, workload_config=LONGER_DIGITS)
    store = Store(server.database_url)
    offsets: list[float] = []
    try:
        with server.client() as client:
            job = client.post("/v1/jobs", json=spec).json()
            wait_for(client, job["id"], {"running"})
            while (current := store.get_job(job["id"])) is not None and current.state == "running":
                # The heartbeat's distance from the database's now: within a heartbeat period (and the grace a new
                # driver gets before its first), never hours.
                if current.heartbeat_at is not None and current.driver_pid is not None:
                    offsets.append((current.heartbeat_at - store.db_now()).total_seconds())
                time.sleep(0.5)
            done = wait_for(client, job["id"], ENDED)
            states = state_events(client, job["id"])
    finally:
        store.close()
    log = (server.data_dir / "logs" / f"{job['id']}.log").read_text()
    # The shim did run in the driver (a standby driver says so in its own log before it takes the job), and in the
    # server.
    assert "this process's clock is -10800 s off" in log + (server.data_dir / "logs" / "standby.log").read_text()
    assert "this process's clock is +3600 s off" in server.log_text()
    assert done["state"] == "succeeded", (done, log[-3000:])
    assert done["attempts"] == 1  # never taken for dead
    assert [e for e in states if e["state"] == "running"] == [{"state": "running"}], states  # one start, no requeue
    assert len(offsets) >= 10, offsets  # sampled for several stale periods
    assert all(-10 < offset < 60 for offset in offsets), offsets  # 60: the start-up grace before a first heartbeat
    assert_each_planned_trial_once(server.database_url, job["id"], spec)


# ---- 9. PostgreSQL drops a running driver's connections ------------------------------------------------------------


def tcp_ports(pid: int) -> set[int]:
    """The local ports of the TCP sockets process `pid` holds open (from /proc: its fds, then the socket table)."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                if fields[9] in inodes:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


class ConnectionDropper(threading.Thread):
    """A burst of `burst` seconds at once, and again `every` seconds after each, in which PostgreSQL terminates every
    backend of the job's driver (as an administrator's pg_terminate_backend or a server restart would), polling every
    20 ms so that writes in flight are cut too. Counts the bursts, the backends terminated, and those cut while busy
    (active or in a transaction)."""

    def __init__(self, database_url: str, job_id: str, every: float = 1.5, burst: float = 0.75) -> None:
        super().__init__(daemon=True)
        self.url = sa.engine.make_url(database_url).set(drivername="postgresql").render_as_string(False)
        self.job_id, self.every, self.burst = job_id, every, burst
        self.stop = threading.Event()
        self.bursts = self.terminated = self.busy = 0

    def run(self) -> None:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as db:
            while not self.stop.is_set():
                self.bursts += 1
                deadline = time.monotonic() + self.burst
                while time.monotonic() < deadline and not self.stop.is_set():
                    row = db.execute("SELECT driver_pid FROM koala_jobs WHERE id = %s", (self.job_id,)).fetchone()
                    ports = list(tcp_ports(row[0])) if row and row[0] else []
                    killed = db.execute(
                        "SELECT state, pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid() AND client_port = ANY(%s)",
                        (ports,),
                    ).fetchall()
                    self.terminated += sum(1 for _, ok in killed if ok)
                    self.busy += sum(1 for state, ok in killed if ok and state != "idle")
                    time.sleep(0.02)
                self.stop.wait(self.every)


@pytest_slow
@pytest.mark.postgres
def test_a_driver_rides_out_postgresql_dropping_its_connections(postgres_url: str, server_factory: Factory) -> None:
    """The driver's writes (heartbeats, progress, events, trial records) retry through lost connections: the job
    succeeds at its first start, every planned trial exactly once, every epoch a trial reported kept."""
    server = server_factory(database_url=postgres_url, stale_seconds=30, heartbeat_seconds=0.5)
    spec = tiny_spec(epochs=6, seeds=2, workload_config=LONGER_DIGITS)
    with server.client() as client:
        job = client.post("/v1/jobs", json=spec).json()
        wait_for(client, job["id"], {"running"})
        wait_until(lambda: job_row(server, job["id"]).driver_pid is not None, 60, "no driver recorded")
        dropper = ConnectionDropper(server.database_url, job["id"])
        dropper.start()
        try:
            done = wait_for(client, job["id"], ENDED)
        finally:
            dropper.stop.set()
            dropper.join()
        trials = client.get(f"/v1/jobs/{job['id']}/trials").json()
    log = (server.data_dir / "logs" / f"{job['id']}.log").read_text()
    assert done["state"] == "succeeded", (done, log[-3000:])
    assert done["attempts"] == 1
    assert dropper.bursts >= 2, vars(dropper)  # (a job of 6 epochs x 2 seeds: 3-5 bursts)
    assert dropper.terminated >= 2, vars(dropper)
    assert dropper.busy >= 1, vars(dropper)  # cut mid-write too, not only idle ones
    assert "database busy while" in log  # the retries did the work
    assert_each_planned_trial_once(server.database_url, job["id"], spec)
    # Nothing acknowledged lost: every trial complete, with every epoch it reported.
    assert len(trials) == 8
    assert all(t["state"] == "complete" and t["epochs_done"] == spec["epochs"] for t in trials), trials
    for name, found in studies_trials(server.database_url, job["id"]).items():
        for trial in found:
            assert sorted(trial.intermediate_values) == list(range(1, spec["epochs"] + 1)), name


# ---- 10. the per-token running cap, through HTTP ------------------------------------------------------------------


@pytest_slow
def test_a_tokens_running_cap_holds_another_tokens_job_goes_ahead(server_factory: Factory) -> None:
    """Three jobs may run at once but only one per token: Alice's second job waits while Bob's starts, and starts once
    her first has ended (without the per-token cap all three would start together)."""
    server = server_factory(max_concurrent_jobs=3, max_running_jobs_per_owner=1, token_cache_seconds=0)
    alice, bob = (create_token(server, "--name", name) for name in ("alice", "bob"))
    spec = tiny_spec(epochs=1, seeds=1, optimizers=[{"name": "sgd", "params": {"lr": 0.1}}])
    with server.client(alice) as as_alice, server.client(bob) as as_bob:
        a1, a2 = (as_alice.post("/v1/jobs", json={**spec, "name": n}).json() for n in ("a1", "a2"))
        b1 = as_bob.post("/v1/jobs", json={**spec, "name": "b1"}).json()
        wait_for(as_bob, b1["id"], {"running", *ENDED})
        assert as_alice.get(f"/v1/jobs/{a1['id']}").json()["state"] == "running"
        assert as_alice.get(f"/v1/jobs/{a2['id']}").json()["state"] == "queued"  # Alice is at her cap
        done = {
            job["id"]: wait_for(client, job["id"], ENDED)
            for client, job in [(as_alice, a1), (as_alice, a2), (as_bob, b1)]
        }
    assert [done[j["id"]]["state"] for j in (a1, a2, b1)] == ["succeeded"] * 3, done
    first, second, other = (done[j["id"]] for j in (a1, a2, b1))
    assert second["started_at"] >= first["finished_at"]  # Alice's second started once her first ended
    assert other["started_at"] < first["finished_at"]  # Bob's ran alongside it
