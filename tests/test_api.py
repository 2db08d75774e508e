"""The HTTP API in-process (FastAPI's TestClient on `create_app`, no scheduler, a SQLite database per app): what the
API accepts and refuses, and how (problem+json naming the field), idempotency, paging, the event stream, the
catalogue and probes, who sees what, and the checks every request passes first (Host, size, origin, credentials).

What needs a real `koala serve` process (kill -9, restarts, `--workers`, drivers, uvicorn's proxy headers, the
refusal to bind a public address without tokens) is in tests/test_service.py and tests/test_security.py."""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from fastapi import FastAPI
from starlette.exceptions import StarletteDeprecationWarning

from koala_client.cli import main as koala_main
from service.app import create_app
from service.settings import Settings
from service.store import Store, sessions
from tests.helpers import tiny_spec

with warnings.catch_warnings():
    # Starlette prefers httpx2 for its TestClient; on httpx, which the SDK uses, it works the same and warns.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient

BASE_URL = "http://127.0.0.1:8000"  # the Host header every request sends, as a browser on the bound address would


@dataclass
class Api:
    """One app and its database; `client(token)` makes further clients (each with its own cookies)."""

    app: FastAPI
    settings: Settings
    anonymous: TestClient
    stack: ExitStack

    @property
    def store(self) -> Store:
        return self.app.state.store  # type: ignore[no-any-return]

    def client(self, token: str | None = None, cookies: dict[str, str] | None = None, **headers: str) -> TestClient:
        if token:
            headers["Authorization"] = f"Bearer {token}"
        # Not entered: the app's lifespan runs once, with `anonymous`.
        client = TestClient(self.app, base_url=BASE_URL, headers=headers, cookies=cookies, follow_redirects=False)
        self.stack.callback(client.close)
        return client

    def koala(self, *args: str) -> Any:
        """`koala ARGS` in-process, against this app's database."""
        env = {"KOALA_DATABASE_URL": self.settings.database_url, "KOALA_DATA_DIR": str(self.settings.data_dir)}
        return CliRunner().invoke(koala_main, list(args), env=env)


class ApiFactory(Protocol):
    def __call__(self, **settings: Any) -> Api: ...


def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No KOALA_* variable or Ray cluster of the test's environment reaches the apps' settings."""
    for key in list(os.environ):
        if key.startswith("KOALA_") or key == "RAY_ADDRESS":
            monkeypatch.delenv(key)


def _start(root: Path, stack: ExitStack, **overrides: Any) -> Api:
    root.mkdir(parents=True)
    values: dict[str, Any] = {
        "data_dir": root,
        "database_url": f"sqlite:///{root / 'koala.db'}",
        "run_scheduler": False,  # submitted jobs stay queued: these tests look at what the API accepts
        "token_cache_seconds": 0,  # a token created or revoked counts at once
        **overrides,
    }
    settings = Settings(**values)
    app = create_app(settings)
    anonymous = stack.enter_context(TestClient(app, base_url=BASE_URL, follow_redirects=False))
    return Api(app, settings, anonymous, stack)


@pytest.fixture
def api_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ApiFactory]:
    """Start apps on fresh databases: `api_factory(**settings)`; all stopped afterwards."""
    _clean_environment(monkeypatch)
    with ExitStack() as stack:
        count = 0

        def start(**overrides: Any) -> Api:
            nonlocal count
            count += 1
            return _start(tmp_path / f"koala-{count}", stack, **overrides)

        yield start


@pytest.fixture(scope="module")
def open_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """One open app (no tokens) for the tests that store nothing: refusals, the catalogue, the probes."""
    with pytest.MonkeyPatch.context() as monkeypatch, ExitStack() as stack:
        _clean_environment(monkeypatch)
        yield _start(tmp_path_factory.mktemp("open") / "koala", stack)


@pytest.fixture
def token_api(api_factory: ApiFactory) -> tuple[Api, dict[str, str]]:
    """An app with tokens: alice, bob, mallory and an admin; one job submitted while it still ran open."""
    api = api_factory(max_queued_jobs_per_owner=3)
    ownerless = api.anonymous.post("/v1/jobs", json=tiny_spec(name="made while open"))
    assert ownerless.status_code == 202, ownerless.text
    tokens = {name: api.store.create_token(name).token for name in ("alice", "bob", "mallory")}
    tokens["admin"] = api.store.create_token("root", admin=True).token
    tokens["ownerless-job"] = ownerless.json()["id"]
    return api, tokens


def problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    return body


# ---- validation: every offending field named, nothing stored ------------------------------------------------------


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
def test_invalid_specs_are_rejected_naming_the_field(open_api: Api, change: dict[str, Any], field: str) -> None:
    client = open_api.anonymous
    body = problem(client.post("/v1/jobs", json=tiny_spec(**change)), 422)
    assert body["status"] == 422
    assert body["title"]
    assert field in [e["field"] for e in body["errors"]], body
    assert client.get("/v1/jobs").json()["jobs"] == []  # nothing stored


def _adam_choices(n: int) -> list[dict[str, Any]]:
    return [{"name": "adam", "search": {"lr": {"choices": [1] * n}}, "trials": 2}]


@pytest.mark.parametrize(
    ("change", "field", "says"),
    [
        ({"workload_config": {"hidden": 10**12}}, "workload_config", "hidden"),
        ({"workload_config": {"batch_size": 10**9}}, "workload_config", "batch_size"),
        ({"workload": "noisy-quadratic", "workload_config": {"dimension": 10**12}}, "workload_config", "dimension"),
        (
            {"workload": "noisy-quadratic", "workload_config": {"samples_per_epoch": 10**15}},
            "workload_config",
            "samples_per_epoch",
        ),
        ({"max_concurrent_trials": 10**6}, "max_concurrent_trials", "10000"),
        ({"max_concurrent_trials": 500}, "max_concurrent_trials", "at most 16"),
        ({"resources": {"cpu": 0.0001}}, "resources.cpu", "at least 0.25"),
        ({"resources": {"gpu": 1000}}, "resources.gpu", "64"),
        ({"name": "x" * 1_000_000}, "name", "200"),
        ({"optimizers": _adam_choices(200_000)}, "optimizers.0.search.lr.choices", "100"),
        ({"optimizers": [{"name": "sgd", "params": {"lr": "not-a-number"}}]}, "optimizers.0", "lr"),
        ({"optimizers": [{"name": "momentum", "params": {"nesterov": 3}}]}, "optimizers.0", "nesterov"),
        ({"optimizers": [{"name": "koala-m", "params": {"initial_covariance": [1, 2]}}]}, "optimizers.0", "tuple"),
        ({"seeds": list(range(20_000))}, "seeds", "10000"),
        ({"trial_time_limit_s": -5}, "trial_time_limit_s", "greater than 0"),
        ({"workload_config": {"hidden": [1] * 10}}, "workload_config", "hidden"),
    ],
)
def test_out_of_range_specs_are_refused_naming_the_field(
    open_api: Api, change: dict[str, Any], field: str, says: str
) -> None:
    client = open_api.anonymous
    body = problem(client.post("/v1/jobs", json=tiny_spec(**change)), 422)
    assert field in [e["field"] for e in body["errors"]], body
    assert says in body["detail"], body["detail"][:500]
    assert client.get("/v1/jobs").json()["jobs"] == []


def test_the_deployments_caps_come_from_settings(api_factory: ApiFactory) -> None:
    limits = {"max_epochs": 5, "max_seeds": 2, "max_trials": 1, "max_concurrent_trials": 1, "min_cpu": 2}
    client = api_factory(limits=limits).anonymous
    fits = {
        "epochs": 5,
        "seeds": 2,
        "max_concurrent_trials": 1,
        "resources": {"cpu": 2},
        "optimizers": [{"name": "sgd"}],
    }
    tuned = [{"name": "adam", "search": {"lr": {"low": 1e-3, "high": 1e-1}}, "trials": 2}]
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"epochs": 6}, "epochs", "at most 5"),
        ({"seeds": 3}, "seeds", "at most 2"),
        ({"optimizers": tuned}, "optimizers.0.trials", "at most 1"),
        ({"max_concurrent_trials": 2}, "max_concurrent_trials", "at most 1"),
        ({"resources": {"cpu": 1}}, "resources.cpu", "at least 2"),
    ]
    for change, field, says in cases:
        body = problem(client.post("/v1/jobs", json=tiny_spec(**{**fits, **change})), 422)
        assert [e["field"] for e in body["errors"]] == [field], body
        assert says in body["detail"], body["detail"]
    assert client.post("/v1/jobs", json=tiny_spec(**fits)).status_code == 202


def test_a_workload_named_by_module_is_refused_without_importing_it(
    open_api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    client = open_api.anonymous
    for name in ("this:x", "venv.__main__:x", "koala.workloads.base:Workload", "os:system"):
        body = problem(client.post("/v1/jobs", json=tiny_spec(workload=name)), 422)
        assert body["field"] == "workload"
        assert "digits-mlp" in body["detail"]
        assert "cifar10-resnet18" in body["detail"]
    assert client.get("/v1/jobs").json()["jobs"] == []
    assert {"this", "venv.__main__"}.isdisjoint(sys.modules)
    assert list(tmp_path.iterdir()) == []  # `venv.__main__` would have created a virtual environment here
    assert "The Zen of Python" not in capfd.readouterr().out  # `this` prints it when imported


@pytest.mark.parametrize("workload", ["cifar10-resnet18", "wikitext2-lstm"])
def test_a_spec_may_not_name_a_data_path(open_api: Api, workload: str) -> None:
    spec = tiny_spec(workload=workload, workload_config={"data_dir": "/etc"}, optimizers=[{"name": "sgd"}])
    body = problem(open_api.anonymous.post("/v1/jobs", json=spec), 422)
    assert body["field"] == "workload_config.data_dir"
    assert "KOALA_DATA_DIR" in body["detail"]


def test_malformed_bodies_and_unknown_paths_get_problem_json(open_api: Api) -> None:
    client = open_api.anonymous
    response = client.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"})
    assert problem(response, 422)["errors"]
    assert problem(client.get("/v1/jobs/does-not-exist"), 404)["detail"] == "no job does-not-exist"
    assert problem(client.get("/v1/jobs", params={"limit": 0}), 422)["field"] == "limit"
    assert problem(client.get("/v1/jobs", params={"cursor": "garbage!"}), 422)["field"] == "cursor"
    assert problem(client.get("/v1/jobs", params={"state": "sleeping"}), 422)["field"] == "state.0"
    problem(client.get("/nowhere"), 404)


# ---- idempotency, paging, events -----------------------------------------------------------------------------------


def test_idempotency_key(api_factory: ApiFactory) -> None:
    client = api_factory().anonymous
    first = client.post("/v1/jobs", json=tiny_spec(), headers={"Idempotency-Key": "k-1"})
    again = client.post("/v1/jobs", json=tiny_spec(), headers={"Idempotency-Key": "k-1"})
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    other = problem(client.post("/v1/jobs", json=tiny_spec(epochs=3), headers={"Idempotency-Key": "k-1"}), 422)
    assert other["field"] == "Idempotency-Key"
    assert first.json()["id"] in other["detail"]
    fresh = client.post("/v1/jobs", json=tiny_spec(), headers={"Idempotency-Key": "k-2"})
    assert fresh.json()["id"] != first.json()["id"]
    assert [j["id"] for j in client.get("/v1/jobs").json()["jobs"]] == [fresh.json()["id"], first.json()["id"]]


def test_pagination_and_state_filter(api_factory: ApiFactory) -> None:
    client = api_factory().anonymous
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


def _events(response: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line.removeprefix("data:")) for line in response.iter_lines() if line.startswith("data:")]


def test_event_stream_of_a_cancelled_queued_job(api_factory: ApiFactory) -> None:
    client = api_factory().anonymous
    job = client.post("/v1/jobs", json=tiny_spec()).json()
    client.post(f"/v1/jobs/{job['id']}/cancel")
    with client.stream("GET", f"/v1/jobs/{job['id']}/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = _events(response)
    assert [e["data"]["state"] for e in events] == ["queued", "cancelled"]
    with client.stream("GET", f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": str(events[0]["id"])}) as r:
        assert [e["id"] for e in _events(r)] == [events[1]["id"]]
    with client.stream("GET", f"/v1/jobs/{job['id']}/events", params={"after": events[1]["id"]}) as r:
        assert _events(r) == []
    assert problem(client.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": "x"}), 422)["field"] == (
        "Last-Event-ID"
    )
    problem(client.get(f"/v1/jobs/{job['id']}/results"), 409)


# ---- catalogue and probes ------------------------------------------------------------------------------------------


def test_catalogue_and_health(open_api: Api) -> None:
    client = open_api.anonymous
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


def test_a_job_compares_koala_diag_with_koala_m(api_factory: ApiFactory) -> None:
    """KoalaDiag is in the catalogue with its fixed defaults, and a JobSpec may put it next to the faithful KOALA-M."""
    client = api_factory().anonymous
    optimizers = {o["name"]: o for o in client.get("/v1/optimizers").json()}
    assert {"koala-diag", "koalapp"} <= set(optimizers)
    defaults = {h["name"]: h["default"] for h in optimizers["koala-diag"]["hyperparameters"]}
    fixed = {"lr": 1.0, "beta2": 0.999, "initial_covariance": 0.1, "process_noise": 1.0, "noise_decay": 0.9}
    assert {key: defaults[key] for key in fixed} == fixed
    spec = tiny_spec(optimizers=[{"name": "koala-diag"}, {"name": "koala-m"}, {"name": "koalapp"}])
    job = client.post("/v1/jobs", json=spec)
    assert job.status_code == 202, job.text
    stored = client.get(f"/v1/jobs/{job.json()['id']}").json()
    assert stored["optimizers"] == ["koala-diag", "koala-m", "koalapp"]
    assert stored["trials_total"] == 6  # 3 optimizers at their defaults, 2 seeds
    refused = problem(
        client.post("/v1/jobs", json=tiny_spec(optimizers=[{"name": "koala-diag", "params": {"momentum": 0.9}}])), 422
    )
    assert refused["field"] == "optimizers.0"
    assert "koala-diag" in refused["detail"]


def test_ranges_are_published_in_the_catalogue_and_the_schema(open_api: Api) -> None:
    client = open_api.anonymous
    workloads = {w["name"]: w for w in client.get("/v1/workloads").json()}
    hidden = workloads["digits-mlp"]["config_schema"]["properties"]["hidden"]
    assert hidden["minimum"] >= 1
    assert hidden["maximum"] <= 100_000
    optimizers = {o["name"]: o for o in client.get("/v1/optimizers").json()}
    types = {h["name"]: h["type"] for h in optimizers["koala-v"]["hyperparameters"]}
    assert types["lr"].startswith("float")
    assert types["measurement_noise"] == "float | None"
    schema = client.get("/openapi.json").json()["components"]["schemas"]
    assert schema["JobSpec"]["properties"]["name"]["maxLength"] == 200
    assert schema["Resources"]["properties"]["cpu"]["maximum"] == 1024


def test_readiness_details_need_a_token(token_api: tuple[Api, dict[str, str]]) -> None:
    api, tokens = token_api
    assert api.anonymous.get("/readyz").json() == {"status": "ready"}
    detailed = api.client(tokens["alice"]).get("/readyz").json()
    assert detailed["database"] == "ok"
    assert detailed["ray"].startswith("local")


def test_readiness_failures_are_explained_only_to_a_token(
    token_api: tuple[Api, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    api, tokens = token_api
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # a Ray cluster that does not answer
    assert problem(api.anonymous.get("/readyz"), 503)["detail"] == "not ready"
    detail = problem(api.client(tokens["alice"]).get("/readyz"), 503)["detail"]
    assert "unreachable at 127.0.0.1:1" in detail


# ---- who sees what -------------------------------------------------------------------------------------------------


def test_auth_matrix(api_factory: ApiFactory) -> None:
    api = api_factory()
    alice, bob = api.store.create_token("alice").token, api.store.create_token("bob").token
    for client in (api.anonymous, api.client("wrong")):
        response = client.get("/v1/jobs")
        problem(response, 401)
        assert response.headers["www-authenticate"] == "Bearer"
        problem(client.post("/v1/jobs", json=tiny_spec()), 401)
    assert api.anonymous.get("/healthz").status_code == 200  # probes need no token
    a, b = api.client(alice), api.client(bob)
    job = a.post("/v1/jobs", json=tiny_spec()).json()
    path = f"/v1/jobs/{job['id']}"
    assert a.get(path).status_code == 200
    for method, suffix in [("GET", ""), ("GET", "/trials"), ("GET", "/results"), ("GET", "/events"),
                           ("POST", "/cancel")]:  # fmt: skip
        problem(b.request(method, path + suffix), 404)
    assert b.get("/v1/jobs").json()["jobs"] == []
    assert [j["id"] for j in a.get("/v1/jobs").json()["jobs"]] == [job["id"]]
    assert a.get(path).json()["state"] == "queued"  # bob's cancel did nothing
    # Idempotency keys are per token: bob's identical key is a new job of his own.
    ka = a.post("/v1/jobs", json=tiny_spec(), headers={"Idempotency-Key": "same"}).json()
    kb = b.post("/v1/jobs", json=tiny_spec(), headers={"Idempotency-Key": "same"}).json()
    assert ka["id"] != kb["id"]


def test_ownerless_jobs_are_visible_only_to_admin_tokens(token_api: tuple[Api, dict[str, str]]) -> None:
    api, tokens = token_api
    job_id = tokens["ownerless-job"]
    bob, admin = api.client(tokens["bob"]), api.client(tokens["admin"])
    problem(bob.get(f"/v1/jobs/{job_id}"), 404)
    problem(bob.post(f"/v1/jobs/{job_id}/cancel"), 404)
    assert job_id not in [j["id"] for j in bob.get("/v1/jobs").json()["jobs"]]
    assert admin.get(f"/v1/jobs/{job_id}").json()["name"] == "made while open"
    assert job_id in [j["id"] for j in admin.get("/v1/jobs").json()["jobs"]]


def test_queued_jobs_per_token_are_capped(token_api: tuple[Api, dict[str, str]]) -> None:
    api, tokens = token_api
    bob, admin = api.client(tokens["bob"]), api.client(tokens["admin"])
    for _ in range(3):
        assert bob.post("/v1/jobs", json=tiny_spec()).status_code == 202
    body = problem(response := bob.post("/v1/jobs", json=tiny_spec()), 429)
    assert int(response.headers["retry-after"]) > 0
    assert "3" in body["detail"]
    assert admin.post("/v1/jobs", json=tiny_spec()).status_code == 202  # another token is not held up


def test_token_list_and_revoke_take_effect_at_once(token_api: tuple[Api, dict[str, str]]) -> None:
    api, tokens = token_api
    listed = api.koala("token", "list")
    assert listed.exit_code == 0, listed.output
    assert "mallory" in listed.stdout
    assert "root" in listed.stdout
    assert "admin" in listed.stdout
    assert tokens["mallory"] not in listed.stdout
    session_id = login(api, tokens["mallory"]).cookies["koala_session"]
    mallory = api.client(tokens["mallory"])
    assert mallory.get("/v1/jobs").status_code == 200
    revoked = api.koala("token", "revoke", "mallory")
    assert revoked.exit_code == 0, revoked.output
    problem(mallory.get("/v1/jobs"), 401)  # no grace period
    problem(api.client(cookies={"koala_session": session_id}).get("/v1/jobs"), 401)
    assert "revoked" in api.koala("token", "list").stdout
    missing = api.koala("token", "revoke", "nobody")
    assert missing.exit_code == 1
    assert "nobody" in missing.stderr


def test_koala_token_create_admin_and_revoke_by_id(token_api: tuple[Api, dict[str, str]]) -> None:
    api, tokens = token_api
    created = api.koala("token", "create", "--admin", "--name", "ops")
    assert created.exit_code == 0, created.output
    token = created.stdout.strip()
    (info,) = [t for t in api.store.list_tokens() if t.name == "ops"]
    assert info.admin
    ops = api.client(token)
    assert ops.get(f"/v1/jobs/{tokens['ownerless-job']}").status_code == 200  # an admin sees the ownerless job
    revoked = api.koala("token", "revoke", info.id)
    assert revoked.exit_code == 0, revoked.output
    problem(ops.get("/v1/jobs"), 401)


# ---- checks before any route: Host, size, origin, credentials, sessions -------------------------------------------


def test_host_header_must_name_this_server(open_api: Api) -> None:
    client = open_api.anonymous
    for host in ("attacker.example", "attacker.example:8000", "127.0.0.1.attacker.example"):
        problem(client.get("/v1/jobs", headers={"Host": host}), 400)
        problem(client.get("/ui", headers={"Host": host}), 400)
    for host in ("localhost", "127.0.0.1:8000", "[::1]:8000"):
        assert client.get("/v1/jobs", headers={"Host": host}).status_code == 200, host
    assert client.get("/healthz", headers={"Host": "10.0.0.7"}).status_code == 200  # probes use pod addresses


def test_allowed_hosts_setting(api_factory: ApiFactory) -> None:
    client = api_factory(allowed_hosts="koala.example.org, *.corp.example").anonymous
    for host, status in [("koala.example.org", 200), ("a.corp.example:8000", 200), ("evil.example", 400)]:
        assert client.get("/v1/jobs", headers={"Host": host}).status_code == status, host


def test_bodies_are_bounded_and_credentials_come_before_the_body(token_api: tuple[Api, dict[str, str]]) -> None:
    api, tokens = token_api
    anonymous, alice = api.anonymous, api.client(tokens["alice"])
    json_body = {"content-type": "application/json"}
    # Without a token nothing is parsed: a malformed body is 401, not 422.
    problem(anonymous.post("/v1/jobs", content=b"{not json", headers=json_body), 401)
    big = b"x" * (2 << 20)
    problem(anonymous.post("/v1/jobs", content=big, headers=json_body), 413)
    problem(alice.post("/v1/jobs", content=big, headers=json_body), 413)

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams in
        for _ in range(40):
            yield b" " * 65536

    problem(alice.post("/v1/jobs", content=chunks(), headers=json_body), 413)
    form = {"content-type": "application/x-www-form-urlencoded"}
    problem(anonymous.post("/ui/login", content=big, headers=form), 413)
    assert alice.get("/healthz").status_code == 200


def test_cross_site_requests_cannot_drive_an_open_server(api_factory: ApiFactory) -> None:
    client = api_factory().anonymous
    for headers in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"}, {"Origin": "null"}):
        problem(client.post("/v1/jobs", json=tiny_spec(), headers=headers), 403)
    assert client.get("/v1/jobs").json()["jobs"] == []
    same = {"Origin": BASE_URL, "Sec-Fetch-Site": "same-origin"}
    job = client.post("/v1/jobs", json=tiny_spec(), headers=same)
    assert job.status_code == 202, job.text
    assert client.post(f"/v1/jobs/{job.json()['id']}/cancel").status_code == 202  # a program: no browser headers


def login(api: Api, token: str) -> httpx.Response:
    return api.client(Origin=BASE_URL).post("/ui/login", data={"token": token, "next": "/ui"})


def test_sessions_are_random_ids_not_tokens_and_end_on_logout(token_api: tuple[Api, dict[str, str]]) -> None:
    api, tokens = token_api
    response = login(api, tokens["alice"])
    assert response.status_code == 303
    session_id = response.cookies["koala_session"]
    assert session_id
    assert tokens["alice"] not in session_id
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie
    assert "samesite=strict" in cookie
    assert "max-age=" in cookie
    assert "secure" not in cookie
    with api.store.engine.connect() as db:
        stored = [r.id_hash for r in db.execute(sa.select(sessions))]
    assert session_id not in stored
    assert len(stored) >= 1
    browser = api.client(cookies={"koala_session": session_id})
    assert browser.get("/v1/jobs").status_code == 200
    # A cookie-authenticated change must come from the server's own pages.
    problem(browser.post("/v1/jobs", json=tiny_spec(), headers={"Origin": "https://evil.example"}), 403)
    problem(browser.post("/v1/jobs", json=tiny_spec(), headers={"Sec-Fetch-Site": "cross-site"}), 403)
    assert browser.post("/v1/jobs", json=tiny_spec(), headers={"Origin": BASE_URL}).status_code == 202
    assert browser.post("/ui/logout", headers={"Origin": BASE_URL}).status_code == 303
    replayed = api.client(cookies={"koala_session": session_id})  # the same cookie, after logout
    problem(replayed.get("/v1/jobs"), 401)
    alice = api.client(tokens["alice"])  # a bearer request is never a cross-site one
    assert alice.get("/v1/jobs", headers={"Origin": "https://evil.example"}).status_code == 200


def test_login_is_bounded_and_same_origin(token_api: tuple[Api, dict[str, str]]) -> None:
    api, tokens = token_api
    form = {"content-type": "application/x-www-form-urlencoded", "Origin": BASE_URL}

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams in
        for _ in range(40):
            yield b"a" * 65536

    problem(api.anonymous.post("/ui/login", content=chunks(), headers=form), 413)
    # A page on another site cannot sign a browser in (with the attacker's token, say).
    elsewhere = api.client(Origin="https://evil.example")
    response = elsewhere.post("/ui/login", data={"token": tokens["mallory"], "next": "/ui"})
    problem(response, 403)
    assert "koala_session" not in response.cookies


def test_secure_cookie_setting_and_session_expiry(api_factory: ApiFactory) -> None:
    api = api_factory(secure_cookies=True, session_seconds=2)
    response = login(api, api.store.create_token("alice").token)
    assert response.status_code == 303
    assert "secure" in response.headers["set-cookie"].lower()
    browser = api.client(cookies={"koala_session": response.cookies["koala_session"]})
    assert browser.get("/v1/jobs").status_code == 200
    time.sleep(2.5)
    assert "expired" in problem(browser.get("/v1/jobs"), 401)["detail"]
