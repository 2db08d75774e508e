"""The comparison engine end to end on a real local Ray (2 CPUs) with tiny workloads, recorded in SQLite."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import ray
import yaml
from optuna.trial import TrialState

from service.engine import TrialEvent, run_job
from service.jobspec import JobSpec
from service.recorder import Recorder, job_study_names, storage_for
from service.report import build_report

pytestmark = [
    pytest.mark.slow,
    # Ray Tune leaves a result file to the garbage collector when a run is stopped; not ours to close.
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]
TINY_DIGITS = {"batch_size": 32, "hidden": 16, "limit_train": 256}


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def storage(tmp_path: Path) -> optuna.storages.BaseStorage:
    return storage_for(f"sqlite:///{tmp_path / 'koala.db'}")


def trials_of(storage: optuna.storages.BaseStorage, job_id: str) -> dict[str, list[optuna.trial.FrozenTrial]]:
    return {
        name.split("/", 1)[1]: optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
        for name in job_study_names(storage, job_id)
    }


def spec(**changes: Any) -> JobSpec:
    data: dict[str, Any] = {
        "workload": "digits-mlp",
        "workload_config": TINY_DIGITS,
        "epochs": 3,
        "seeds": 2,
        "target": 0.5,
        "max_concurrent_trials": 2,
        "optimizers": [{"name": "koala-v"}],
    }
    return JobSpec.parse({**data, **changes})


def test_fixed_and_tuned_with_asha(local_ray: None, storage: optuna.storages.BaseStorage) -> None:
    job = spec(
        scheduler="asha",
        optimizers=[
            {"name": "koala-v"},
            {"name": "adam", "search": {"lr": {"low": 1e-4, "high": 1e-1, "log": True}}, "trials": 4},
        ],
    )
    events: list[TrialEvent] = []
    outcome = run_job(job, Recorder(storage, "e2e", job), on_event=events.append)
    assert outcome.state == "succeeded", outcome.error

    trials = trials_of(storage, "e2e")
    assert sorted(trials) == ["adam", "koala-v"]
    koala = trials["koala-v"]
    assert [t.state for t in koala] == [TrialState.COMPLETE] * 2
    assert sorted(t.user_attrs["seed"] for t in koala) == [0, 1]
    for t in koala:
        assert t.user_attrs["phase"] == "eval"
        assert t.user_attrs["epochs_done"] == 3
        assert t.user_attrs["device"] == "cpu"
        assert t.user_attrs["diverged"] is False
        assert t.user_attrs["wall_seconds"] > 0
        assert len(t.user_attrs["epoch_seconds"]) == 3
        assert sorted(t.intermediate_values) == [1, 2, 3]
        assert t.value == t.intermediate_values[3]  # the final value is the last epoch's metric

    adam = trials["adam"]
    tuning = [t for t in adam if t.user_attrs["phase"] == "tune"]
    evaluation = [t for t in adam if t.user_attrs["phase"] == "eval"]
    assert len(tuning) == 4
    assert len(evaluation) == 2
    assert all(t.user_attrs["seed"] == 0 for t in tuning)
    assert {t.state for t in tuning} <= {TrialState.COMPLETE, TrialState.PRUNED}
    for t in tuning:
        assert 1e-4 <= t.params["lr"] <= 1e-1
        if t.state == TrialState.PRUNED:  # ASHA stopped it: fewer epochs, and the reason says so
            assert t.user_attrs["epochs_done"] < 3
            assert t.user_attrs["reason"] == "early-stopped"
    best = max((t for t in tuning if t.state == TrialState.COMPLETE), key=lambda t: t.value or 0)
    assert all(t.params == best.params and t.state == TrialState.COMPLETE for t in evaluation)
    assert all(t.state != TrialState.RUNNING for ts in trials.values() for t in ts)
    assert sum(e.kind == "finished" for e in events) == 8

    # The report, recomputed here from the trials themselves.
    report = build_report(storage, "e2e")
    by_name = {r.optimizer: r for r in report.optimizers}
    koala_finals = [float(t.value) for t in koala]  # type: ignore[arg-type]
    assert by_name["koala-v"].final_mean == pytest.approx(statistics.mean(koala_finals))
    assert by_name["koala-v"].final_std == pytest.approx(statistics.stdev(koala_finals))
    assert by_name["koala-v"].curve[0].mean == pytest.approx(statistics.mean(t.intermediate_values[1] for t in koala))
    assert by_name["adam"].mode == "tuned"
    assert by_name["adam"].hyperparams == best.user_attrs["hyperparams"]
    assert by_name["adam"].trials == {"COMPLETE": 2 + sum(t.state == TrialState.COMPLETE for t in tuning)} | (
        {"PRUNED": n} if (n := sum(t.state == TrialState.PRUNED for t in tuning)) else {}
    )
    assert by_name["adam"].compute_seconds == pytest.approx(sum(t.user_attrs["wall_seconds"] for t in adam))
    assert by_name["adam"].tuning_seconds == pytest.approx(sum(t.user_attrs["wall_seconds"] for t in tuning))
    finals = {r.optimizer: r.final_mean for r in report.optimizers}
    assert report.ranking == sorted(finals, key=lambda name: -(finals[name] or 0))
    (cost,) = report.hpo_cost
    assert cost.optimizer == "adam"
    assert cost.koala_result == pytest.approx(by_name["koala-v"].final_mean)
    if cost.matched:
        assert cost.ratio == pytest.approx(cost.tuning_seconds_to_match / cost.koala_seconds_per_run)  # type: ignore[operator]


def test_diverging_baseline_fails_and_the_job_completes(local_ray: None, storage: optuna.storages.BaseStorage) -> None:
    job = spec(seeds=1, optimizers=[{"name": "koala-m"}, {"name": "sgd", "params": {"lr": 1e4}}])
    outcome = run_job(job, Recorder(storage, "diverge", job))
    assert outcome.state == "succeeded"
    trials = trials_of(storage, "diverge")
    (sgd,) = trials["sgd"]
    assert sgd.state == TrialState.FAIL
    assert sgd.user_attrs["reason"] == "diverged"
    assert sgd.user_attrs["diverged"] is True
    assert trials["koala-m"][0].state == TrialState.COMPLETE
    assert build_report(storage, "diverge").ranking == ["koala-m"]


def test_stop_midway_leaves_no_running_trial(local_ray: None, storage: optuna.storages.BaseStorage) -> None:
    job = spec(epochs=30, seeds=3, optimizers=[{"name": "koala-v"}, {"name": "adam"}])
    stop = threading.Event()

    def on_event(event: TrialEvent) -> None:
        if event.kind == "epoch":
            stop.set()  # the service's cancel: as soon as some trial has reported an epoch

    outcome = run_job(job, Recorder(storage, "stopped", job), stop=stop, on_event=on_event)
    assert outcome.state == "cancelled"
    states = [t for ts in trials_of(storage, "stopped").values() for t in ts]
    assert states
    assert all(t.state != TrialState.RUNNING for t in states)
    assert any(t.state == TrialState.PRUNED and t.user_attrs["reason"] == "cancelled" for t in states)


def _koala(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "koala_client.cli", *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ, KOALA_DATA_DIR=str(tmp_path / "data"), RAY_ADDRESS="")
    env.pop("RAY_ADDRESS")
    return env


def test_koala_run_prints_and_writes_the_report(tmp_path: Path, cli_env: dict[str, str]) -> None:
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(
        yaml.safe_dump(
            {
                "workload": "noisy-quadratic",
                "workload_config": {"dimension": 20, "samples_per_epoch": 256},
                "epochs": 2,
                "seeds": 2,
                "optimizers": [
                    {"name": "koala-m"},
                    {"name": "adam", "search": {"lr": {"low": 1e-3, "high": 1.0, "log": True}}, "trials": 2},
                ],
            }
        )
    )
    out = tmp_path / "out"
    process = _koala("run", str(spec_file), "--out", str(out), "--job-id", "cli", env=cli_env)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output
    assert "koala-m" in output
    assert "adam" in output
    assert "HPO cost ratio" in output
    report = json.loads((out / "report.json").read_text())
    assert {r["optimizer"] for r in report["optimizers"]} == {"koala-m", "adam"}
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    storage = storage_for(f"sqlite:///{tmp_path / 'data' / 'koala.db'}")
    assert len(job_study_names(storage, "cli")) == 2


def optuna_schema_ready(database: Path) -> bool:
    """Whether Optuna finished creating its tables in `database` (its version row is written last)."""
    if not database.exists():
        return False
    with contextlib.closing(sqlite3.connect(database)) as db:
        try:
            return bool(db.execute("SELECT count(*) FROM alembic_version").fetchone()[0])
        except sqlite3.OperationalError:  # not created yet
            return False


def test_koala_run_ctrl_c_leaves_no_running_trial(tmp_path: Path, cli_env: dict[str, str]) -> None:
    spec_file = tmp_path / "job.yaml"
    job = {"workload": "digits-mlp", "epochs": 50, "seeds": 4, "optimizers": [{"name": "koala-v"}, {"name": "sgd"}]}
    spec_file.write_text(yaml.safe_dump(job))
    database = tmp_path / "runs.db"
    process = _koala("run", str(spec_file), "--db", f"sqlite:///{database}", "--job-id", "ctrlc", env=cli_env)
    storage = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # wait until a trial is running and has reported an epoch
        time.sleep(1)
        if optuna_schema_ready(database):  # opening storage earlier would race the run's own schema creation
            storage = storage or storage_for(f"sqlite:///{database}")
            running = [t for ts in trials_of(storage, "ctrlc").values() for t in ts if t.state == TrialState.RUNNING]
            if any(t.intermediate_values for t in running):
                break
    else:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=300)
        raise AssertionError(f"no trial of `koala run` reported an epoch within 300 s:\n{output[-4000:]}")
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 130, output
    assert storage is not None
    trials = [t for ts in trials_of(storage, "ctrlc").values() for t in ts]
    assert all(t.state != TrialState.RUNNING for t in trials)
    assert any(t.user_attrs.get("reason") == "cancelled" for t in trials)


def test_a_trial_no_node_can_hold_fails_the_job_at_once(local_ray: None, storage: optuna.storages.BaseStorage) -> None:
    job = spec(resources={"cpu": 1, "gpu": 0.5})  # this Ray cluster has no GPU at all
    started = time.perf_counter()
    outcome = run_job(job, Recorder(storage, "nogpu", job))
    assert outcome.state == "failed"
    assert outcome.error is not None
    assert "resources: a trial asks for 1 CPU and 0.5 GPU" in outcome.error
    assert time.perf_counter() - started < 30
    assert all(not trials for trials in trials_of(storage, "nogpu").values())
