"""The service as a hostile client sees it, through a real `koala serve`: nothing a client sends is imported or used
as a path, every size is bounded, bodies and headers are checked before a route reads them, sessions are not
tokens, revocation is immediate, ownerless jobs are for admins, and one token cannot flood the queue.

(Fencing of drivers, time limits, clean-up and the scheduler's fairness: tests/test_driver_safety.py.)"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from service.store import Store, sessions
from service.testing import LiveServer
from tests.helpers import create_token, koala_cli, start_server, tiny_spec

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = start_server(tmp_path_factory.mktemp("open"), "server")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, dict[str, str]]]:
    """A server with tokens: alice, bob and an admin; one job submitted while it still ran open."""
    server = start_server(tmp_path_factory.mktemp("tokens"), "server", max_queued_jobs_per_owner="3")
    with server.client() as anonymous:
        ownerless = anonymous.post("/v1/jobs", json=tiny_spec(name="made while open"))
        assert ownerless.status_code == 202, ownerless.text
    tokens = {name: create_token(server, "--name", name) for name in ("alice", "bob", "mallory")}
    tokens["admin"] = create_token(server, "--name", "root", "--admin")
    tokens["ownerless-job"] = ownerless.json()["id"]
    yield server, tokens
    server.stop()


def problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    return body


# ---- 1. nothing a client sends is imported or used as a path -------------------------------------------------------


def test_a_workload_named_by_module_is_refused_without_importing_it(open_server: LiveServer) -> None:
    with open_server.client() as client:
        for name in ("this:x", "venv.__main__:x", "koala.workloads.base:Workload", "os:system"):
            body = problem(client.post("/v1/jobs", json=tiny_spec(workload=name)), 422)
            assert body["field"] == "workload"
            assert "digits-mlp" in body["detail"]
            assert "cifar10-resnet18" in body["detail"]
        assert client.get("/v1/jobs").json()["jobs"] == []
    server_cwd = open_server.data_dir / "cwd"
    assert list(server_cwd.iterdir()) == []  # `venv.__main__` would have created a virtual environment here
    assert "The Zen of Python" not in open_server.log_text()  # `this` prints it when imported


@pytest.mark.parametrize("workload", ["cifar10-resnet18", "wikitext2-lstm"])
def test_a_spec_may_not_name_a_data_path(open_server: LiveServer, workload: str) -> None:
    spec = tiny_spec(workload=workload, workload_config={"data_dir": "/etc"}, optimizers=[{"name": "sgd"}])
    with open_server.client() as client:
        body = problem(client.post("/v1/jobs", json=spec), 422)
    assert body["field"] == "workload_config.data_dir"
    assert "KOALA_DATA_DIR" in body["detail"]


def test_koala_run_refuses_an_abstract_or_broken_workload_class(open_server: LiveServer, tmp_path: Path) -> None:
    (tmp_path / "my_workloads.py").write_text(
        "from koala.workloads import Workload\n"
        "class Half(Workload):\n"
        "    metric, mode = 'val_accuracy', 'max'\n"
        "raise_here = None\n"
    )
    (tmp_path / "broken_workloads.py").write_text("def oops(:\n")
    for name, expected in [("my_workloads:Half", "abstract"), ("broken_workloads:X", "broken_workloads")]:
        job = tmp_path / f"{name.split(':')[0]}.yaml"
        job.write_text(f"workload: '{name}'\nepochs: 1\nseeds: 1\noptimizers: [{{name: sgd}}]\n")
        result = subprocess.run(
            [sys.executable, "-m", "koala_client.cli", "run", str(job)],
            env={**open_server.env, "PYTHONPATH": str(tmp_path)},
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
        assert result.returncode == 2, result.stderr
        assert "workload" in result.stderr, result.stderr
        assert expected in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


# ---- 2. every size is bounded --------------------------------------------------------------------------------------


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
    open_server: LiveServer, change: dict[str, Any], field: str, says: str
) -> None:
    with open_server.client() as client:
        body = problem(client.post("/v1/jobs", json=tiny_spec(**change)), 422)
        fields = [e["field"] for e in body["errors"]]
        assert field in fields, body
        assert says in body["detail"], body["detail"][:500]
        assert client.get("/v1/jobs").json()["jobs"] == []


def test_ranges_are_published_in_the_catalogue_and_the_schema(open_server: LiveServer) -> None:
    with open_server.client() as client:
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


def test_bodies_are_bounded_and_credentials_come_before_the_body(
    token_server: tuple[LiveServer, dict[str, str]],
) -> None:
    server, tokens = token_server
    with server.client() as anonymous, server.client(tokens["alice"]) as alice:
        # Without a token nothing is parsed: a malformed body is 401, not 422.
        response = anonymous.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"})
        problem(response, 401)
        big = b"x" * (2 << 20)
        problem(anonymous.post("/v1/jobs", content=big, headers={"content-type": "application/json"}), 413)
        problem(alice.post("/v1/jobs", content=big, headers={"content-type": "application/json"}), 413)

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams in
            for _ in range(40):
                yield b" " * 65536

        problem(alice.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"}), 413)
        form = {"content-type": "application/x-www-form-urlencoded"}
        problem(anonymous.post("/ui/login", content=big, headers=form), 413)
        assert alice.get("/healthz").status_code == 200


# ---- 3. identity, sessions and fairness ----------------------------------------------------------------------------


def test_host_header_must_name_this_server(open_server: LiveServer) -> None:
    with open_server.client() as client:
        for host in ("attacker.example", "attacker.example:8000", "127.0.0.1.attacker.example"):
            problem(client.get("/v1/jobs", headers={"Host": host}), 400)
            problem(client.get("/ui", headers={"Host": host}), 400)
        for host in ("localhost", f"127.0.0.1:{open_server.port}", f"[::1]:{open_server.port}"):
            assert client.get("/v1/jobs", headers={"Host": host}).status_code == 200, host
        assert client.get("/healthz", headers={"Host": "10.0.0.7"}).status_code == 200  # probes use pod addresses


def test_allowed_hosts_setting(tmp_path: Path) -> None:
    server = start_server(tmp_path, "hosts", allowed_hosts="koala.example.org, *.corp.example")
    try:
        with server.client() as client:
            for host, status in [("koala.example.org", 200), ("a.corp.example:8000", 200), ("evil.example", 400)]:
                assert client.get("/v1/jobs", headers={"Host": host}).status_code == status, host
    finally:
        server.stop()


def test_cross_site_requests_cannot_drive_an_open_server(open_server: LiveServer) -> None:
    own = f"http://127.0.0.1:{open_server.port}"
    with open_server.client() as client:
        for headers in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"}, {"Origin": "null"}):
            problem(client.post("/v1/jobs", json=tiny_spec(), headers=headers), 403)
        assert client.get("/v1/jobs").json()["jobs"] == []
        same = {"Origin": own, "Sec-Fetch-Site": "same-origin"}
        job = client.post("/v1/jobs", json=tiny_spec(), headers=same)
        assert job.status_code == 202, job.text
        assert client.post(f"/v1/jobs/{job.json()['id']}/cancel").status_code == 202  # a program: no browser headers


def login(server: LiveServer, token: str) -> httpx.Response:
    own = f"http://127.0.0.1:{server.port}"
    with httpx.Client(base_url=server.url, headers={"Origin": own}) as browser:
        return browser.post("/ui/login", data={"token": token, "next": "/ui"})


def test_sessions_are_random_ids_not_tokens_and_end_on_logout(token_server: tuple[LiveServer, dict[str, str]]) -> None:
    server, tokens = token_server
    response = login(server, tokens["alice"])
    assert response.status_code == 303
    session_id = response.cookies["koala_session"]
    assert session_id
    assert tokens["alice"] not in session_id
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie
    assert "samesite=strict" in cookie
    assert "max-age=" in cookie
    assert "secure" not in cookie
    store = Store(server.database_url)
    try:
        with store.engine.connect() as db:
            stored = [r.id_hash for r in db.execute(sa.select(sessions))]
        assert session_id not in stored
        assert len(stored) >= 1
    finally:
        store.close()
    own = f"http://127.0.0.1:{server.port}"
    with httpx.Client(base_url=server.url, cookies={"koala_session": session_id}) as browser:
        assert browser.get("/v1/jobs").status_code == 200
        # A cookie-authenticated change must come from the server's own pages.
        problem(browser.post("/v1/jobs", json=tiny_spec(), headers={"Origin": "https://evil.example"}), 403)
        problem(browser.post("/v1/jobs", json=tiny_spec(), headers={"Sec-Fetch-Site": "cross-site"}), 403)
        assert browser.post("/v1/jobs", json=tiny_spec(), headers={"Origin": own}).status_code == 202
        assert browser.post("/ui/logout", headers={"Origin": own}).status_code == 303
        problem(browser.get("/v1/jobs"), 401)  # the same cookie, replayed after logout
    with server.client(tokens["alice"]) as alice:  # a bearer request is never a cross-site one
        assert alice.get("/v1/jobs", headers={"Origin": "https://evil.example"}).status_code == 200


def test_secure_cookie_behind_a_trusted_tls_proxy(tmp_path: Path) -> None:
    server = start_server(tmp_path, "proxy", trusted_proxies="127.0.0.1")
    try:
        token = create_token(server, "--name", "user")
        own = f"https://127.0.0.1:{server.port}"
        with httpx.Client(base_url=server.url, headers={"Origin": own, "X-Forwarded-Proto": "https"}) as browser:
            response = browser.post("/ui/login", data={"token": token, "next": "/ui"})
        assert response.status_code == 303, response.text
        assert "secure" in response.headers["set-cookie"].lower()
    finally:
        server.stop()


def test_token_list_and_revoke_take_effect_at_once(token_server: tuple[LiveServer, dict[str, str]]) -> None:
    server, tokens = token_server
    listed = koala_cli(server, "token", "list")
    assert listed.returncode == 0, listed.stderr
    assert "mallory" in listed.stdout
    assert "root" in listed.stdout
    assert "admin" in listed.stdout
    assert tokens["mallory"] not in listed.stdout
    session_id = login(server, tokens["mallory"]).cookies["koala_session"]
    with server.client(tokens["mallory"]) as mallory:
        assert mallory.get("/v1/jobs").status_code == 200
        revoked = koala_cli(server, "token", "revoke", "mallory")
        assert revoked.returncode == 0, revoked.stderr
        problem(mallory.get("/v1/jobs"), 401)  # no grace period
    with httpx.Client(base_url=server.url, cookies={"koala_session": session_id}) as browser:
        problem(browser.get("/v1/jobs"), 401)
    assert "revoked" in koala_cli(server, "token", "list").stdout
    missing = koala_cli(server, "token", "revoke", "nobody")
    assert missing.returncode == 1
    assert "nobody" in missing.stderr


def test_ownerless_jobs_are_visible_only_to_admin_tokens(token_server: tuple[LiveServer, dict[str, str]]) -> None:
    server, tokens = token_server
    job_id = tokens["ownerless-job"]
    with server.client(tokens["bob"]) as bob, server.client(tokens["admin"]) as admin:
        problem(bob.get(f"/v1/jobs/{job_id}"), 404)
        problem(bob.post(f"/v1/jobs/{job_id}/cancel"), 404)
        assert job_id not in [j["id"] for j in bob.get("/v1/jobs").json()["jobs"]]
        assert admin.get(f"/v1/jobs/{job_id}").json()["name"] == "made while open"
        assert job_id in [j["id"] for j in admin.get("/v1/jobs").json()["jobs"]]


def test_queued_jobs_per_token_are_capped(token_server: tuple[LiveServer, dict[str, str]]) -> None:
    server, tokens = token_server
    with server.client(tokens["bob"]) as bob, server.client(tokens["admin"]) as admin:
        for _ in range(3 - len(bob.get("/v1/jobs", params={"state": "queued"}).json()["jobs"])):
            assert bob.post("/v1/jobs", json=tiny_spec()).status_code == 202
        body = problem(response := bob.post("/v1/jobs", json=tiny_spec()), 429)
        assert int(response.headers["retry-after"]) > 0
        assert "3" in body["detail"]
        assert admin.post("/v1/jobs", json=tiny_spec()).status_code == 202  # another token is not held up


def test_readiness_details_need_a_token(token_server: tuple[LiveServer, dict[str, str]]) -> None:
    server, tokens = token_server
    with server.client() as anonymous, server.client(tokens["alice"]) as alice:
        assert anonymous.get("/readyz").json() == {"status": "ready"}
        detailed = alice.get("/readyz").json()
        assert detailed["database"] == "ok"
        assert detailed["ray"].startswith("local")
