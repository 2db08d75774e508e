"""Our tables (Store), the Optuna recorder and the report, on SQLite and on PostgreSQL (the two databases the
service supports). PostgreSQL cases use a fresh database each and are skipped when no server can be reached."""

from __future__ import annotations

import hashlib
import statistics
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy as sa
from optuna.trial import TrialState

from service.jobspec import JobSpec
from service.recorder import Recorder, close_running, job_study_names, storage_for, study_name
from service.report import build_report
from service.searcher import JobSearcher
from service.store import BadCursorError, IdempotencyConflictError, JobRow, Store, api_tokens, body_hash, job_store
from service.store.tables import MIGRATIONS


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'koala.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    db = Store(database_url)
    db.migrate()
    yield db
    db.close()


@pytest.fixture
def storage(database_url: str) -> Iterator[optuna.storages.RDBStorage]:
    rdb = storage_for(database_url)
    assert isinstance(rdb, optuna.storages.RDBStorage)
    yield rdb
    rdb.engine.dispose()


def new_job(store: Store, name: str = "job", owner: str | None = None, **kwargs: Any) -> JobRow:
    job, created = store.create_job(
        {"workload": "digits-mlp", "name": name},
        name=name,
        workload="digits-mlp",
        progress={"sgd": {"done": 0, "total": 2}},
        owner=owner,
        **kwargs,
    )
    assert created
    return job


def tables(engine: sa.engine.Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names())


# ---- Store: schema ------------------------------------------------------------------------------------------------


OUR_VERSION = "SELECT version_num FROM koala_schema_version"


def head_revision() -> str:
    """The newest revision of our migrations (what `migrate` brings a database to)."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None
    return head


def test_migrate_is_idempotent_and_leaves_optunas_version_table_alone(database_url: str) -> None:
    store = Store(database_url)
    try:
        store.migrate()
        store.migrate()
        names = tables(store.engine)
        assert {"koala_jobs", "koala_job_events", "koala_idempotency_keys", "koala_api_tokens"} <= names
        assert "koala_schema_version" in names
        assert "alembic_version" not in names  # ours lives in koala_schema_version only
        with store.engine.connect() as db:
            assert db.execute(sa.text(OUR_VERSION)).scalars().all() == [head_revision()]

        optuna_storage = storage_for(database_url)  # Optuna creates its tables and its own alembic_version
        try:
            with store.engine.connect() as db:
                optuna_version = db.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all()
            assert optuna_version
            store.migrate()
            with store.engine.connect() as db:
                assert db.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all() == optuna_version
                assert db.execute(sa.text(OUR_VERSION)).scalars().all() == [head_revision()]
        finally:
            optuna_storage.engine.dispose()  # type: ignore[attr-defined]
    finally:
        store.close()


# ---- Store: jobs --------------------------------------------------------------------------------------------------


def test_create_and_get_job(store: Store) -> None:
    job = new_job(store, "first", owner="tok1")
    again = store.get_job(job.id)
    assert again == job
    assert job.state == "queued"
    assert job.owner == "tok1"
    assert job.spec == {"workload": "digits-mlp", "name": "first"}
    assert job.progress == {"sgd": {"done": 0, "total": 2}}
    assert job.created_at.tzinfo is not None
    assert job.attempts == 0
    assert job.started_at is job.finished_at is None
    assert store.get_job("nope") is None
    assert [(e.kind, e.data) for e in store.events_after(job.id)] == [("state", {"state": "queued"})]
    schema = job.to_schema()
    assert (schema.trials_done, schema.trials_total, schema.optimizers) == (0, 2, ["sgd"])


def test_idempotency_keys(store: Store) -> None:
    body = {"workload": "digits-mlp", "epochs": 1}
    first = new_job(store, idempotency_key="k", request_hash=body_hash(body))
    repeat, created = store.create_job(
        body, name="job", workload="digits-mlp", progress={}, idempotency_key="k", request_hash=body_hash(body)
    )
    assert not created
    assert repeat.id == first.id
    with pytest.raises(IdempotencyConflictError) as conflict:
        store.create_job(
            body, name="job", workload="digits-mlp", progress={}, idempotency_key="k", request_hash=body_hash({})
        )
    assert conflict.value.job_id == first.id
    # Keys are scoped per owner: another token's identical key is a new job.
    other = new_job(store, owner="someone", idempotency_key="k", request_hash=body_hash(body))
    assert other.id != first.id
    assert len(store.list_jobs()[0]) == 2


def test_list_pages_with_a_cursor_even_when_creation_times_tie(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = []
    for i in range(5):  # one second apart; jobs 1 and 3 belong to token "a", the others to nobody (open mode)
        monkeypatch.setattr(job_store, "now", lambda i=i: datetime(2030, 1, 1, 0, 0, i, tzinfo=UTC))
        ids.append(new_job(store, f"job {i}", owner="a" if i % 2 else None).id)
    monkeypatch.setattr(job_store, "now", lambda: datetime(2030, 1, 2, tzinfo=UTC))
    tied = [new_job(store, f"tied {i}").id for i in range(4)]  # the same created_at: the id breaks the tie

    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        page, cursor = store.list_jobs(limit=2, cursor=cursor)
        seen += [job.id for job in page]
        pages += 1
        if cursor is None:
            break
    assert seen == sorted(tied, reverse=True) + ids[::-1]
    assert pages == 5

    owned = {ids[1], ids[3]}
    mine, _ = store.list_jobs(owner="a", restrict_owner=True)
    assert {job.id for job in mine} == owned  # ownerless jobs (made while the server ran open) are for admins
    admin, _ = store.list_jobs(owner="b", restrict_owner=True, include_ownerless=True, limit=100)
    assert {job.id for job in admin} == set(ids + tied) - owned
    store.request_cancel(ids[0])
    assert [job.id for job in store.list_jobs(states=["cancelled"])[0]] == [ids[0]]
    assert len(store.list_jobs(states=["queued", "cancelled"], limit=100)[0]) == 9
    with pytest.raises(BadCursorError):
        store.list_jobs(cursor="not-a-cursor!")


def claim_concurrently(stores: list[Store], job_id: str) -> list[bool]:
    """Every store claims the job at the same moment, each from its own thread; returns who won."""
    barrier = threading.Barrier(len(stores))
    wins: list[bool] = []

    def claim(db: Store, host: str) -> None:
        barrier.wait()
        wins.append(db.claim(job_id, host) is not None)

    threads = [threading.Thread(target=claim, args=(db, f"h{i}")) for i, db in enumerate(stores)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return wins


def test_two_schedulers_race_for_a_job_and_one_wins(database_url: str, store: Store) -> None:
    other = Store(database_url)  # a second API process
    try:
        for _ in range(5):
            job = new_job(store)
            assert sorted(claim_concurrently([store, other], job.id)) == [False, True]
            claimed = store.get_job(job.id)
            assert claimed is not None
            assert claimed.state == "running"
            assert claimed.attempts == 1
            assert claimed.started_at is not None
            assert claimed.driver_host in {"h0", "h1"}
            assert not store.claim(job.id, "h3")  # only queued jobs can be claimed
    finally:
        other.close()


def test_cancel_and_finish_transitions(store: Store) -> None:
    queued = new_job(store)
    cancelled = store.request_cancel(queued.id)
    assert cancelled is not None
    assert cancelled.state == "cancelled"
    assert cancelled.finished_at is not None
    assert store.request_cancel(queued.id).state == "cancelled"  # type: ignore[union-attr]  # idempotent
    assert not store.claim(queued.id, "h")
    assert not store.finish(queued.id, "succeeded")  # a finished job stays finished

    running = new_job(store)
    assert store.claim(running.id, "h")
    assert store.heartbeat(running.id) == "running"
    assert store.request_cancel(running.id).state == "cancelling"  # type: ignore[union-attr]
    assert store.heartbeat(running.id) == "cancelling"  # what the driver reads to stop
    assert store.finish(running.id, "succeeded")  # a cancel request wins over success
    assert store.get_job(running.id).state == "cancelled"  # type: ignore[union-attr]

    done = new_job(store)
    store.claim(done.id, "h")
    assert store.finish(done.id, "succeeded")
    assert store.get_job(done.id).state == "succeeded"  # type: ignore[union-attr]
    assert store.request_cancel(done.id).state == "succeeded"  # type: ignore[union-attr]

    failed = new_job(store)
    store.claim(failed.id, "h")
    assert store.requeue(failed.id, "its driver died; resuming")
    assert not store.requeue(failed.id, "again")  # only running jobs are requeued
    assert store.claim(failed.id, "h")
    assert store.get_job(failed.id).attempts == 2  # type: ignore[union-attr]
    assert store.finish(failed.id, "failed", "boom")
    final = store.get_job(failed.id)
    assert final is not None
    assert (final.state, final.error) == ("failed", "boom")
    changes = [e.data for e in store.events_after(failed.id) if e.kind == "state"]
    states = [change["state"] for change in changes]
    assert [s for i, s in enumerate(states) if i == 0 or s != states[i - 1]] == [
        "queued",
        "running",
        "queued",
        "running",
        "failed",
    ]
    assert {"state": "queued", "reason": "its driver died; resuming"} in changes
    assert changes[-1] == {"state": "failed", "error": "boom"}
    assert store.jobs_in(["failed"])[0].id == failed.id


def test_events_after(store: Store) -> None:
    job, other = new_job(store), new_job(store)
    for epoch in range(1, 6):
        store.add_event(job.id, "epoch", {"epoch": epoch})
    store.add_event(other.id, "epoch", {"epoch": 99})
    events = store.events_after(job.id)
    assert [e.kind for e in events] == ["state"] + ["epoch"] * 5
    assert [e.id for e in events] == sorted(e.id for e in events)
    assert all(e.job_id == job.id and e.at.tzinfo is not None for e in events)
    later = store.events_after(job.id, after=events[2].id)
    assert [e.data["epoch"] for e in later] == [3, 4, 5]
    assert [e.data["epoch"] for e in store.events_after(job.id, after=events[0].id, limit=2)] == [1, 2]
    assert store.events_after(job.id, after=events[-1].id) == []


def test_tokens_are_stored_hashed(store: Store) -> None:
    assert not store.has_tokens(max_age=0)
    created = store.create_token("ci")
    assert created.name == "ci"
    assert created.token.startswith("koala_")
    assert store.has_tokens(max_age=0)
    assert store.token_owner(created.token) == created.id
    assert store.token_owner(created.token + "x") is None
    with store.engine.connect() as db:
        rows = [dict(row._mapping) for row in db.execute(sa.select(api_tokens))]
    assert len(rows) == 1
    assert rows[0]["token_hash"] == hashlib.sha256(created.token.encode()).hexdigest()
    assert not any(created.token in str(value) for value in rows[0].values())  # the raw token is nowhere
    assert store.create_token().name.startswith("token-")


# ---- Recorder -----------------------------------------------------------------------------------------------------

SPEC = JobSpec.parse(
    {
        "workload": "digits-mlp",
        "epochs": 2,
        "seeds": 2,
        "target": 0.85,
        "optimizers": [
            {"name": "koala-m"},
            {"name": "adam", "search": {"lr": {"low": 1e-4, "high": 1e-1, "log": True}}, "trials": 2},
        ],
    }
)


def entry(name: str) -> Any:
    return next(e for e in SPEC.optimizers if e.name == name)


def test_recorder_open_report_close(storage: optuna.storages.RDBStorage) -> None:
    recorder = Recorder(storage, "j1", SPEC)
    Recorder(storage, "j1", SPEC)  # a second driver start loads the same studies
    assert job_study_names(storage, "j1") == [study_name("j1", "adam"), study_name("j1", "koala-m")]
    attrs = recorder.study("adam").user_attrs
    assert (attrs["mode"], attrs["metric"], attrs["direction"], attrs["seeds"]) == (
        "tuned",
        "val_accuracy",
        "maximize",
        [0, 1],
    )

    fixed = recorder.open(entry("koala-m"), "eval", 1, {"lr": 1.0})
    Recorder.report(fixed, 1, 0.5)
    Recorder.report(fixed, 2, float("nan"))  # non-finite values are not recorded
    Recorder.close(fixed, TrialState.COMPLETE, value=0.9, attrs={"wall_seconds": 3.0})
    tuned = recorder.open(entry("adam"), "tune", 0)
    assert 1e-4 <= tuned.hyperparams["lr"] <= 1e-1
    Recorder.close(tuned, TrialState.PRUNED, reason="early-stopped")
    failing = recorder.open(entry("adam"), "eval", 0, {"lr": 0.01})
    Recorder.close(failing, TrialState.FAIL)

    (koala,) = recorder.study("koala-m").get_trials()
    assert koala.state == TrialState.COMPLETE
    assert koala.value == 0.9
    assert koala.intermediate_values == {1: 0.5}
    assert koala.params == {"lr": 1.0}
    assert koala.user_attrs["seed"] == 1
    assert koala.user_attrs["phase"] == "eval"
    assert koala.user_attrs["wall_seconds"] == 3.0
    assert koala.user_attrs["reason"] is None
    pruned, failed = recorder.study("adam").get_trials()
    assert (pruned.state, pruned.user_attrs["reason"], pruned.user_attrs["phase"]) == (
        TrialState.PRUNED,
        "early-stopped",
        "tune",
    )
    assert (failed.state, failed.user_attrs["reason"]) == (TrialState.FAIL, "no finite metric")
    assert failed.params == {"lr": 0.01}  # a searched name keeps its search distribution in eval trials


def test_close_running_and_adopt(storage: optuna.storages.RDBStorage) -> None:
    recorder = Recorder(storage, "j2", SPEC)
    left = recorder.open(entry("koala-m"), "eval", 0, {})
    recorder.open(entry("adam"), "tune", 0)
    done = recorder.open(entry("koala-m"), "eval", 1, {})
    Recorder.close(done, TrialState.COMPLETE, value=1.0)

    # A new driver adopts the koala-m trial the dead one left RUNNING: same trial, one more restart.
    successor = Recorder(storage, "j2", SPEC)
    frozen = next(t for t in successor.study("koala-m").get_trials() if t.state == TrialState.RUNNING)
    assert frozen.number == left.trial.number
    adopted = successor.adopt(frozen)
    assert (adopted.optimizer, adopted.phase, adopted.seed) == ("koala-m", "eval", 0)
    Recorder.report(adopted, 1, 0.7)
    Recorder.close(adopted, TrialState.COMPLETE, value=0.7)
    koala = successor.study("koala-m").get_trials()
    assert len(koala) == 2
    assert koala[0].user_attrs["restarts"] == 1
    assert koala[0].state == TrialState.COMPLETE

    # What is still RUNNING (the adam tuning trial) is closed with the reason.
    assert close_running(storage, "j2", "its driver died", TrialState.FAIL) == 1
    (adam,) = successor.study("adam").get_trials()
    assert (adam.state, adam.user_attrs["reason"]) == (TrialState.FAIL, "its driver died")
    assert successor.close_dangling("again") == 0


def test_trial_asked_but_never_attributed_is_closed_and_its_slot_planned_again(
    storage: optuna.storages.RDBStorage,
) -> None:
    """A driver killed between asking Optuna for a trial and writing its attributes (one write each) leaves a RUNNING
    trial that belongs to no planned slot: the next driver closes it and plans the slot afresh."""
    recorder = Recorder(storage, "j4", SPEC)
    done = recorder.open(entry("koala-m"), "eval", 0, {})
    Recorder.close(done, TrialState.COMPLETE, value=1.0)
    orphan = recorder.study("koala-m").ask()
    orphan.set_user_attr("optimizer", "koala-m")  # killed here: no seed, hyperparams or phase yet

    successor = Recorder(storage, "j4", SPEC)
    searcher = JobSearcher(SPEC, successor, threading.Event())
    (closed,) = [t for t in successor.study("koala-m").get_trials() if t.number == orphan.number]
    assert (closed.state, closed.user_attrs["reason"]) == (TrialState.FAIL, "interrupted before it started")
    planned = [(p.entry.name, p.phase, p.seed, p.adopt) for p in searcher.ready if p.entry.name == "koala-m"]
    assert planned == [("koala-m", "eval", 1, None)]  # seed 0 is done; seed 1 is planned, nothing adopted
    report = build_report(storage, "j4")
    assert next(r for r in report.optimizers if r.optimizer == "koala-m").trials == {"COMPLETE": 1}


def test_trial_enqueued_but_never_asked_is_closed_and_never_handed_to_the_next_driver(
    storage: optuna.storages.RDBStorage,
) -> None:
    """A fixed-parameter trial is enqueued, then asked: a driver killed between the two leaves a WAITING trial that
    Optuna would hand to the next `ask` of that study, with the dead driver's parameters. The next driver closes it."""
    recorder = Recorder(storage, "j5", SPEC)
    recorder.study("koala-m").enqueue_trial({"stale": 1}, skip_if_exists=False)  # killed here, before the ask

    successor = Recorder(storage, "j5", SPEC)
    JobSearcher(SPEC, successor, threading.Event())
    (stale,) = successor.study("koala-m").get_trials()
    assert (stale.state, stale.user_attrs["reason"]) == (TrialState.FAIL, "interrupted before it started")
    fresh = successor.open(entry("koala-m"), "eval", 0, {})
    assert fresh.trial.number != stale.number
    assert "stale" not in fresh.trial.params


# ---- report -------------------------------------------------------------------------------------------------------


def test_report_on_a_hand_made_job(storage: optuna.storages.RDBStorage) -> None:
    recorder = Recorder(storage, "j3", SPEC)

    def trial(name: str, phase: Any, seed: int, curve: list[float], seconds: float, **params: Any) -> None:
        fixed = None if phase == "tune" else params
        opened = recorder.open(entry(name), phase, seed, fixed)
        for epoch, value in enumerate(curve, start=1):
            Recorder.report(opened, epoch, value)
        attrs = {"wall_seconds": seconds, "epoch_seconds": [seconds / len(curve)] * len(curve)}
        Recorder.close(opened, TrialState.COMPLETE, value=curve[-1], attrs=attrs)

    trial("koala-m", "eval", 0, [0.80, 0.90], 10.0)
    trial("koala-m", "eval", 1, [0.70, 0.80], 10.0)
    trial("adam", "tune", 0, [0.60, 0.70], 5.0)
    trial("adam", "tune", 0, [0.75, 0.86], 7.0)
    trial("adam", "eval", 0, [0.80, 0.88], 6.0, lr=0.01)
    trial("adam", "eval", 1, [0.80, 0.84], 6.0, lr=0.01)

    report = build_report(storage, "j3")
    assert (report.job_id, report.metric, report.direction, report.target) == ("j3", "val_accuracy", "maximize", 0.85)
    by_name = {r.optimizer: r for r in report.optimizers}
    koala, adam = by_name["koala-m"], by_name["adam"]
    assert koala.mode == "fixed"
    assert koala.final_mean == pytest.approx(0.85)
    assert koala.final_std == pytest.approx(statistics.stdev([0.9, 0.8]))
    assert (koala.final_min, koala.final_max, koala.seeds) == (0.8, 0.9, 2)
    assert [(p.epoch, p.n) for p in koala.curve] == [(1, 2), (2, 2)]
    assert koala.curve[0].mean == pytest.approx(0.75)
    assert koala.curve[0].std == pytest.approx(statistics.stdev([0.8, 0.7]))
    assert koala.target is not None
    assert (koala.target.reached, koala.target.of, koala.target.epochs_mean) == (1, 2, 2)
    assert koala.target.seconds_mean == pytest.approx(10.0)  # both epochs of the seed that reached it
    assert koala.compute_seconds == pytest.approx(20.0)
    assert koala.tuning_seconds == 0
    assert koala.trials == {"COMPLETE": 2}

    assert adam.mode == "tuned"
    assert adam.hyperparams["lr"] == 0.01
    assert adam.final_mean == pytest.approx(0.86)
    assert adam.compute_seconds == pytest.approx(24.0)
    assert adam.tuning_seconds == pytest.approx(12.0)
    assert adam.trials == {"COMPLETE": 4}
    assert report.ranking == ["adam", "koala-m"]

    (cost,) = report.hpo_cost
    assert (cost.optimizer, cost.koala_optimizer, cost.matched) == ("adam", "koala-m", True)
    assert cost.koala_result == pytest.approx(0.85)
    assert cost.tuning_trials_to_match == 2  # the second tuning trial (0.86) is the first to match 0.85
    assert cost.tuning_seconds_to_match == pytest.approx(12.0)
    assert cost.koala_seconds_per_run == pytest.approx(10.0)
    assert cost.ratio == pytest.approx(1.2)
    assert cost.ratio_lower_bound is None
    with pytest.raises(LookupError):
        build_report(storage, "no-such-job")
