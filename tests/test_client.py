"""The SDK and the `koala` commands against a scripted server (httpx.MockTransport), without the service.

A fake server is used only for what a real one cannot easily be made to do: malformed bodies, streams that break
at a chosen byte, a job whose state changes on cue. The end-to-end tests against the real service are elsewhere.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from pydantic import BaseModel

from koala_client import (
    KoalaAPIError,
    KoalaAuthError,
    KoalaClient,
    KoalaConnectionError,
    KoalaError,
    KoalaNotFound,
    cli,
)
from koala_client.models import Event, Job, Report
from koala_client.sdk import parse_sse

BASE = "http://koala.test"
Handler = Callable[[httpx.Request], httpx.Response]


class FakeServer:
    """Answers each (method, path) from a script of responses, the last one repeated; records every request."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], list[httpx.Response | Handler]] = {}
        self.requests: list[httpx.Request] = []
        self.http = httpx.Client(transport=httpx.MockTransport(self.handle), base_url=BASE)

    def on(self, method: str, path: str, *responses: httpx.Response | Handler) -> None:
        self.routes[(method, path)] = list(responses)

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        script = self.routes.get((request.method, request.url.path))
        if not script:
            return problem(404, f"no route {request.method} {request.url.path}")
        answer = script.pop(0) if len(script) > 1 else script[0]
        return answer(request) if callable(answer) else answer

    def client(self, **kwargs: Any) -> KoalaClient:
        client = KoalaClient(http=self.http, **kwargs)
        client.retry_backoff = 0.0
        return client

    def sent(self, method: str, path: str) -> list[httpx.Request]:
        return [r for r in self.requests if r.method == method and r.url.path == path]


@pytest.fixture(autouse=True)
def no_koala_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KOALA_URL", "KOALA_TOKEN"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def server() -> Iterator[FakeServer]:
    fake = FakeServer()
    yield fake
    fake.http.close()


def job(job_id: str = "j1", state: str = "running", done: int = 0, total: int = 4, error: str | None = None) -> Job:
    return Job(
        id=job_id,
        name="digits",
        workload="digits-mlp",
        optimizers=["koala-m", "sgd"],
        state=state,  # type: ignore[arg-type]
        spec={"workload": "digits-mlp"},
        progress={"koala-m": {"done": min(done, 2), "total": 2}, "sgd": {"done": max(done - 2, 0), "total": 2}},  # type: ignore[dict-item]
        trials_done=done,
        trials_total=total,
        error=error,
        created_at=datetime(2025, 1, 2, 3, 4, tzinfo=UTC),
    )


def ok(model: BaseModel | list[Any] | dict[str, Any], status: int = 200) -> httpx.Response:
    if isinstance(model, BaseModel):
        return httpx.Response(status, content=model.model_dump_json(), headers={"content-type": "application/json"})
    return httpx.Response(status, json=model)


def problem(status: int, detail: str, **extra: Any) -> httpx.Response:
    body = {"type": "about:blank", "title": "Problem", "status": status, "detail": detail, **extra}
    return httpx.Response(status, json=body, headers={"content-type": "application/problem+json"})


def sse(event_id: int, kind: str, data: dict[str, Any], job_id: str = "j1") -> str:
    payload = {"id": event_id, "job_id": job_id, "kind": kind, "at": "2025-01-02T03:04:05Z", "data": data}
    return f"id: {event_id}\r\nevent: {kind}\r\ndata: {json.dumps(payload)}\r\n\r\n"


def stream(*chunks: str, then: Exception | None = None) -> Handler:
    """An event-stream response sending `chunks` as they are, then breaking with `then` when given."""

    def respond(request: httpx.Request) -> httpx.Response:
        def body() -> Iterator[bytes]:
            for chunk in chunks:
                yield chunk.encode()
            if then is not None:
                raise then

        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body())

    return respond


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# ---- requests and errors -------------------------------------------------------------------------------------------


def test_list_iterates_every_page_passing_the_cursor_on(server: FakeServer) -> None:
    first = {"jobs": [job("a").model_dump(mode="json"), job("b").model_dump(mode="json")], "next_cursor": "c1"}
    last = {"jobs": [job("c").model_dump(mode="json")], "next_cursor": None}
    server.on("GET", "/v1/jobs", ok(first), ok(last))
    with server.client() as client:
        assert [j.id for j in client.list(state="running", limit=2)] == ["a", "b", "c"]
    params = [dict(r.url.params) for r in server.requests]
    assert params == [{"state": "running", "limit": "2"}, {"state": "running", "limit": "2", "cursor": "c1"}]


def test_submit_reads_a_yaml_file_and_sends_idempotency_key_and_token(server: FakeServer, tmp_path: Path) -> None:
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text("workload: digits-mlp\nepochs: 2\noptimizers:\n  - name: koala-m\n")
    server.on("POST", "/v1/jobs", ok(job(state="queued"), status=202))
    with server.client(token="secret") as client:
        submitted = client.submit(spec_file, idempotency_key="retry-1")
    assert submitted.state == "queued"
    (request,) = server.requests
    assert request.headers["Idempotency-Key"] == "retry-1"
    assert request.headers["Authorization"] == "Bearer secret"
    assert json.loads(request.content) == {"workload": "digits-mlp", "epochs": 2, "optimizers": [{"name": "koala-m"}]}


class Spec(BaseModel):
    workload: str
    epochs: int = 10


@pytest.mark.parametrize(
    ("make_spec", "expected"),
    [
        (lambda d: {"workload": "w", "epochs": 3}, {"workload": "w", "epochs": 3}),
        (lambda d: Spec(workload="w"), {"workload": "w"}),  # unset defaults are the server's to fill
        (lambda d: str(_write(d / "s.json", '{"workload": "w"}')), {"workload": "w"}),
    ],
)
def test_submit_accepts_mapping_model_and_json_path(
    server: FakeServer, tmp_path: Path, make_spec: Callable[[Path], Any], expected: dict[str, Any]
) -> None:
    server.on("POST", "/v1/jobs", ok(job(), status=202))
    with server.client() as client:
        client.submit(make_spec(tmp_path))
    (request,) = server.requests
    assert json.loads(request.content) == expected
    assert "Idempotency-Key" not in request.headers
    assert "Authorization" not in request.headers


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [("list.yaml", "- a\n- b\n", "must be a mapping"), ("bad.json", "{nope", "cannot read job spec")],
)
def test_unreadable_spec_files_raise_koala_error(tmp_path: Path, name: str, text: str, message: str) -> None:
    with KoalaClient(base_url=f"http://127.0.0.1:{closed_port()}") as client, pytest.raises(KoalaError, match=message):
        client.submit(_write(tmp_path / name, text))


def test_problem_json_becomes_api_error_with_field(server: FakeServer) -> None:
    errors = [{"field": "epochs", "message": "must be >= 1"}, {"field": "optimizers.0.name", "message": "unknown"}]
    detail = "epochs: must be >= 1; optimizers.0.name: unknown"
    server.on("POST", "/v1/jobs", problem(422, detail, title="Invalid request", field="epochs", errors=errors))
    with server.client() as client, pytest.raises(KoalaAPIError) as caught:
        client.submit({"workload": "digits-mlp", "epochs": 0})
    error = caught.value
    assert (error.status, error.title, error.detail, error.field, error.errors) == (
        422,
        "Invalid request",
        detail,
        "epochs",
        errors,
    )
    assert str(error) == f"{detail} (field: epochs)"


@pytest.mark.parametrize(
    ("status", "error_type"), [(404, KoalaNotFound), (401, KoalaAuthError), (403, KoalaAuthError), (409, KoalaAPIError)]
)
def test_status_picks_the_error_class(server: FakeServer, status: int, error_type: type[KoalaAPIError]) -> None:
    server.on("GET", "/v1/jobs/j1/results", problem(status, "nope"))
    with server.client() as client, pytest.raises(error_type, match=r"^nope$") as caught:
        client.results("j1")
    assert type(caught.value) is error_type
    assert caught.value.status == status
    assert caught.value.field is None


def test_non_json_error_body_keeps_the_raw_text(server: FakeServer) -> None:
    server.on("GET", "/v1/jobs/j1", httpx.Response(502, text="<html>upstream timed out</html>\n"))
    with server.client() as client, pytest.raises(KoalaAPIError) as caught:
        client.get("j1")
    assert (caught.value.status, caught.value.title, caught.value.detail) == (
        502,
        "Bad Gateway",
        "<html>upstream timed out</html>",
    )


def test_success_body_of_another_shape_is_a_koala_error(server: FakeServer) -> None:
    server.on("GET", "/v1/jobs/j1", httpx.Response(200, text="<html>a proxy login page</html>"))
    with server.client() as client, pytest.raises(KoalaError, match="another version"):
        client.get("j1")


def test_unreachable_server_names_the_url_and_koala_serve() -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    with KoalaClient(base_url=url) as client, pytest.raises(KoalaConnectionError) as caught:
        client.health()
    assert url in str(caught.value)
    assert "koala serve" in str(caught.value)
    assert isinstance(caught.value.__cause__, httpx.ConnectError)


def test_url_and_token_default_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KOALA_URL", "http://gpu-box:9000/")
    monkeypatch.setenv("KOALA_TOKEN", "from-env")
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"status": "ok"})

    with httpx.Client(transport=httpx.MockTransport(answer)) as http:
        assert KoalaClient(http=http).health() == {"status": "ok"}
    assert str(seen[0].url) == "http://gpu-box:9000/healthz"
    assert seen[0].headers["Authorization"] == "Bearer from-env"


# ---- events, follow and wait ---------------------------------------------------------------------------------------


def test_sse_parsing_handles_split_chunks_comments_and_unknown_events(server: FakeServer) -> None:
    one, two, three = sse(1, "state", {"state": "running"}), sse(2, "trial", {"optimizer": "sgd"}), sse(3, "epoch", {})
    multi_line = three.replace('"data": {}', '\r\ndata: "data": {}')  # one JSON value over two data lines
    chunks = [
        ": ping\r\n\r\n" + one[:10],  # keep-alive comment, then an event cut mid-field
        one[10:] + two + "event: hello\r\ndata: not json\r\n\r\n",  # the rest, a whole event, an unknown type
        multi_line,
        ": ping\r\n\r\n",
    ]
    server.on("GET", "/v1/jobs/j1/events", stream(*chunks))
    with server.client() as client:
        events = list(client.events("j1"))
    assert [(e.id, e.kind, e.data) for e in events] == [
        (1, "state", {"state": "running"}),
        (2, "trial", {"optimizer": "sgd"}),
        (3, "epoch", {}),
    ]
    assert "Last-Event-ID" not in server.requests[0].headers


def test_parse_sse_drops_an_event_cut_off_by_the_end_of_the_stream() -> None:
    lines = [*sse(1, "state", {"state": "running"}).split("\r\n"), "id: 2", "event: state"]
    assert [sse_id for sse_id, _ in parse_sse(lines)] == [1]


def test_broken_stream_resumes_from_the_last_event_id(server: FakeServer) -> None:
    server.on(
        "GET",
        "/v1/jobs/j1/events",
        stream(sse(8, "epoch", {}), sse(9, "epoch", {}) + "id: 10\r\n", then=httpx.ReadError("connection reset")),
        stream(sse(10, "state", {"state": "succeeded"})),
    )
    with server.client() as client:
        assert [e.id for e in client.events("j1", after=7)] == [8, 9, 10]
    assert [r.headers["Last-Event-ID"] for r in server.requests] == ["7", "9"]


def test_stream_that_keeps_breaking_gives_up_after_the_retries(server: FakeServer) -> None:
    server.on(
        "GET",
        "/v1/jobs/j1/events",
        stream(sse(1, "epoch", {}), then=httpx.RemoteProtocolError("peer closed")),
        stream(then=httpx.ReadError("reset")),
    )
    with server.client() as client:
        client.event_retries = 2
        received: list[Event] = []
        with pytest.raises(KoalaConnectionError, match="koala serve"):
            received.extend(client.events("j1"))
    assert [e.id for e in received] == [1]
    assert len(server.requests) == 1 + 2  # the first stream, then two retries


def test_wait_follows_events_and_returns_the_terminal_job(server: FakeServer) -> None:
    server.on(
        "GET",
        "/v1/jobs/j1",
        ok(job(state="queued")),
        ok(job(state="running")),
        ok(job(state="running", done=1)),
        ok(job(state="succeeded", done=4)),
    )
    server.on(
        "GET",
        "/v1/jobs/j1/events",
        stream(
            sse(1, "state", {"state": "running"}),
            sse(2, "trial", {"optimizer": "koala-m", "state": "complete"}),
            sse(3, "epoch", {"optimizer": "sgd", "epoch": 1, "value": 0.5}),
            sse(4, "state", {"state": "succeeded"}),
        ),
    )
    seen: list[tuple[str, int]] = []
    with server.client() as client:
        client.refresh_seconds = 0.0
        final = client.wait("j1", progress=lambda j: seen.append((j.state, j.trials_done)))
    assert (final.state, final.trials_done) == ("succeeded", 4)
    assert seen == [("queued", 0), ("running", 0), ("running", 1), ("succeeded", 4)]
    assert len(server.sent("GET", "/v1/jobs/j1")) == 4  # epoch events do not re-read the job


def test_wait_polls_when_the_server_has_no_event_stream(server: FakeServer) -> None:
    server.on("GET", "/v1/jobs/j1", ok(job(state="queued")), ok(job(state="running")), ok(job(state="failed")))
    server.on("GET", "/v1/jobs/j1/events", problem(404, "Not Found"))
    seen: list[str] = []
    with server.client() as client:
        assert client.wait("j1", progress=lambda j: seen.append(j.state), poll=0.0).state == "failed"
    assert seen == ["queued", "running", "failed"]


def test_wait_gives_up_at_the_timeout(server: FakeServer) -> None:
    server.on("GET", "/v1/jobs/j1", ok(job(state="running")))
    server.on("GET", "/v1/jobs/j1/events", problem(501, "no streams here"))
    with server.client() as client, pytest.raises(TimeoutError, match="j1"):
        client.wait("j1", poll=0.01, timeout=0.05)


def test_wait_on_a_missing_job_raises_not_found(server: FakeServer) -> None:
    server.on("GET", "/v1/jobs/nope", problem(404, "no job nope"))
    with server.client() as client, pytest.raises(KoalaNotFound, match="no job nope"):
        client.wait("nope")


def test_importing_the_sdk_loads_no_heavy_dependency() -> None:
    code = (
        "import sys, koala_client; print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'ray', 'optuna'}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# ---- the commands --------------------------------------------------------------------------------------------------


@pytest.fixture
def runner(server: FakeServer, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    """Server commands talk to the fake server, whatever --url says; --token still applies."""
    monkeypatch.setattr(cli, "make_client", lambda url, token: server.client(token=token))
    return CliRunner()


def report(job_id: str = "j1") -> Report:
    row = {
        "mode": "fixed",
        "hyperparams": {},
        "trials": {"complete": 2},
        "final_mean": 0.9,
        "final_std": 0.01,
        "final_min": 0.89,
        "final_max": 0.91,
        "seeds": 2,
        "curve": [{"epoch": 1, "mean": 0.8, "std": 0.02, "n": 2}, {"epoch": 2, "mean": 0.9, "std": 0.01, "n": 2}],
        "target": None,
        "compute_seconds": 3.0,
        "tuning_seconds": 0.0,
    }
    return Report.model_validate(
        {
            "job_id": job_id,
            "metric": "val_accuracy",
            "direction": "maximize",
            "target": None,
            "optimizers": [{"optimizer": "koala-m", **row}, {"optimizer": "sgd", **row, "final_mean": 0.8}],
            "ranking": ["koala-m", "sgd"],
            "hpo_cost": [],
        }
    )


def test_submit_prints_only_the_job_id_on_stdout(server: FakeServer, runner: CliRunner, tmp_path: Path) -> None:
    server.on("POST", "/v1/jobs", ok(job("abc123", state="queued"), status=202))
    spec_file = _write(tmp_path / "job.yaml", "workload: digits-mlp\n")
    result = runner.invoke(cli.main, ["submit", str(spec_file), "--idempotency-key", "k1", "--token", "t0"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "abc123\n"
    assert "koala watch abc123" in result.stderr
    assert server.requests[0].headers["Idempotency-Key"] == "k1"
    assert server.requests[0].headers["Authorization"] == "Bearer t0"


def test_invalid_spec_exits_1_with_the_server_message(server: FakeServer, runner: CliRunner, tmp_path: Path) -> None:
    server.on("POST", "/v1/jobs", problem(422, "optimizers[0].name: unknown optimizer 'nope'", field="optimizers"))
    result = runner.invoke(cli.main, ["submit", str(_write(tmp_path / "job.yaml", "workload: w\n"))])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.strip() == "error: optimizers[0].name: unknown optimizer 'nope' (field: optimizers)"


def test_unreachable_server_exits_2() -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    result = CliRunner().invoke(cli.main, ["jobs", "--url", url])
    assert result.exit_code == 2
    assert url in result.stderr
    assert "koala serve" in result.stderr


def _watched(server: FakeServer, final: Job) -> None:
    server.on("GET", "/v1/jobs/j1", ok(job(state="running")), ok(final))
    server.on(
        "GET",
        "/v1/jobs/j1/events",
        stream(
            sse(1, "epoch", {"optimizer": "koala-m", "phase": "eval", "seed": 0, "epoch": 1, "value": 0.7}),
            sse(2, "epoch", {"optimizer": "koala-m", "phase": "eval", "seed": 0, "epoch": 2, "value": 0.93}),
            sse(3, "epoch", {"optimizer": "koala-m", "phase": "eval", "seed": 1, "epoch": 1, "value": 0.6}),
            sse(4, "state", {"state": final.state}),
        ),
    )
    info = {
        "name": "digits-mlp",
        "description": "MLP on 8x8 digits",
        "metric": "val_accuracy",
        "mode": "max",
        "metrics": {"val_accuracy": "max", "val_loss": "min"},
        "config": {"hidden": 64},
        "config_schema": {},
    }
    server.on("GET", "/v1/workloads", ok([info]))
    server.on("GET", "/v1/jobs/j1/results", ok(report()))


@pytest.mark.parametrize(
    ("final", "code", "message"),
    [
        (job(state="succeeded", done=4), 0, "val_accuracy (maximize), job j1"),  # the report's title
        (job(state="failed", done=1, error="driver died 3 times"), 1, "error: job j1 failed: driver died 3 times"),
        (job(state="cancelled", done=1), 3, "job j1 cancelled"),
    ],
)
def test_watch_exit_code_follows_the_final_state(
    server: FakeServer, runner: CliRunner, final: Job, code: int, message: str
) -> None:
    _watched(server, final)
    result = runner.invoke(cli.main, ["watch", "j1"])
    assert result.exit_code == code, result.output
    assert "best val_accuracy 0.93" in result.stderr  # the best epoch value, not the latest
    assert message in (result.stdout if code == 0 else result.stderr)
    assert bool(server.sent("GET", "/v1/jobs/j1/results")) == (code == 0)


def test_submit_watch_prints_the_id_then_follows(server: FakeServer, runner: CliRunner, tmp_path: Path) -> None:
    _watched(server, job(state="failed", error="boom"))
    server.on("POST", "/v1/jobs", ok(job(state="queued"), status=202))
    result = runner.invoke(cli.main, ["submit", str(_write(tmp_path / "job.yaml", "workload: w\n")), "--watch"])
    assert result.exit_code == 1
    assert result.stdout.splitlines()[0] == "j1"
    assert "job j1 failed: boom" in result.stderr


def test_jobs_table(server: FakeServer, runner: CliRunner) -> None:
    server.on("GET", "/v1/jobs", ok({"jobs": [job("j7", done=3).model_dump(mode="json")], "next_cursor": "more"}))
    result = runner.invoke(cli.main, ["jobs", "--state", "running", "--limit", "1"])
    assert result.exit_code == 0, result.output
    assert "j7" in result.stdout
    assert "3/4" in result.stdout
    assert len(server.requests) == 1  # --limit 1 is satisfied by the first page
    assert dict(server.requests[0].url.params) == {"state": "running", "limit": "1"}


def test_results_as_json_and_plot(server: FakeServer, runner: CliRunner, tmp_path: Path) -> None:
    server.on("GET", "/v1/jobs/j1/results", ok(report()))
    png = tmp_path / "curves.png"
    result = runner.invoke(cli.main, ["results", "j1", "--json", "--plot", str(png)])
    assert result.exit_code == 0, result.output
    assert Report.model_validate_json(result.stdout) == report()
    assert png.read_bytes().startswith(b"\x89PNG")


def test_results_before_any_trial_exits_1(server: FakeServer, runner: CliRunner) -> None:
    server.on("GET", "/v1/jobs/j1/results", problem(409, "job j1 has no recorded trials yet (it is queued)"))
    result = runner.invoke(cli.main, ["results", "j1"])
    assert result.exit_code == 1
    assert "error: job j1 has no recorded trials yet" in result.stderr


def test_cancel_prints_the_new_state(server: FakeServer, runner: CliRunner) -> None:
    server.on("POST", "/v1/jobs/j1/cancel", ok(job(state="cancelling"), status=202))
    result = runner.invoke(cli.main, ["cancel", "j1"])
    assert (result.exit_code, result.stdout) == (0, "cancelling\n")


def test_workloads_and_optimizers_tables(server: FakeServer, runner: CliRunner) -> None:
    _watched(server, job())
    server.on(
        "GET",
        "/v1/optimizers",
        ok(
            [
                {
                    "name": "sgd",
                    "description": "SGD",
                    "hyperparameters": [{"name": "lr", "default": 0.1, "type": "float"}],
                }
            ]
        ),
    )
    workloads = runner.invoke(cli.main, ["workloads"])
    optimizers = runner.invoke(cli.main, ["optimizers"])
    assert (workloads.exit_code, optimizers.exit_code) == (0, 0)
    assert "digits-mlp" in workloads.stdout
    assert "val_accuracy (max)" in workloads.stdout
    assert "lr=0.1" in optimizers.stdout


def test_token_create_writes_to_the_server_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from service.store import Store

    url = f"sqlite:///{tmp_path / 'koala.db'}"
    monkeypatch.setenv("KOALA_DATABASE_URL", url)
    result = CliRunner().invoke(cli.main, ["token", "create", "--name", "ci"])
    assert result.exit_code == 0, result.output
    token = result.stdout.strip()
    assert "export KOALA_TOKEN=" in result.stderr
    store = Store(url)
    try:
        assert store.token_owner(token) is not None
    finally:
        store.close()


def test_serve_passes_host_port_and_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, int, int]] = []
    monkeypatch.setattr("service.app.serve", lambda host, port, workers: calls.append((host, port, workers)))
    result = CliRunner().invoke(cli.main, ["serve", "--host", "0.0.0.0", "--port", "8123", "--workers", "3"])
    assert result.exit_code == 0, result.output
    assert calls == [("0.0.0.0", 8123, 3)]


# ---- without the service installed ---------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
# What the `service` and `optim` extras add to a client install (tests/test_client_install.py checks a real one).
SERVICE_PACKAGES = frozenset(
    {"torch", "numba", "ray", "optuna", "fastapi", "uvicorn", "sqlalchemy", "alembic", "pydantic_settings", "psycopg"}
    | {"plotly", "optuna_dashboard", "a2wsgi"}
)
# Runs the `koala` command line with some packages made unimportable, as in an install that lacks them; prints, on
# stderr at exit, which of the project's server-side packages were imported.
WITHOUT = """
import atexit, importlib.abc, json, sys
blocked = set(json.loads(sys.argv[1]))

class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Missing())
loaded = lambda: sorted({m.partition(".")[0] for m in sys.modules} & {"service", "koala", "torch", "ray", "optuna"})
atexit.register(lambda: print("loaded:", json.dumps(loaded()), file=sys.stderr))
from koala_client.cli import main
main(sys.argv[2:], prog_name="koala")
"""


def koala_without(
    blocked: set[str] | frozenset[str], *args: str, env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run `koala ARGS` in a fresh interpreter where the `blocked` packages cannot be imported; returns the process
    and the server-side packages it imported."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("KOALA_")} | (env or {})
    command = [sys.executable, "-c", WITHOUT, json.dumps(sorted(blocked)), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=environment, cwd=ROOT)
    marker = [line for line in result.stderr.splitlines() if line.startswith("loaded: ")]
    assert marker, result.stderr
    return result, json.loads(marker[-1].removeprefix("loaded: "))


@pytest.mark.parametrize(
    ("args", "missing"),
    [
        (["serve"], None),
        (["run", "examples/digits.yaml"], None),
        (["dashboard"], None),
        (["token", "create"], "sqlalchemy"),
        (["token", "list"], "sqlalchemy"),
        (["token", "revoke", "ci"], "sqlalchemy"),
    ],
)
def test_service_commands_without_the_service_say_what_to_install(
    tmp_path: Path, args: list[str], missing: str | None
) -> None:
    result, _ = koala_without(SERVICE_PACKAGES, *args, env={"KOALA_DATA_DIR": str(tmp_path)})
    assert result.returncode == 1, result.stderr
    message = "error: this command runs the service: install koala-optim[service] (missing module: "
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    name = result.stderr.partition(message)[2].partition(")")[0]
    assert name.partition(".")[0] in ({missing} if missing else SERVICE_PACKAGES)
    assert not list(tmp_path.iterdir())  # nothing was started or written


def test_remote_commands_import_neither_service_nor_optimizer(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    spec = _write(tmp_path / "job.yaml", "workload: digits-mlp\nepochs: 1\noptimizers: [{name: sgd}]\n")
    workload = tmp_path / "my_workload"
    workload.mkdir()
    (workload / "model.py").write_text("X = 1\n")
    commands = [
        ["jobs"],
        ["watch", "j1"],
        ["results", "j1", "--plot", str(tmp_path / "curves.png")],
        ["cancel", "j1"],
        ["workloads"],
        ["optimizers"],
        ["submit", str(spec), "--workload-dir", str(workload)],
        ["uploads", "list"],
        ["uploads", "show", "ab"],
        ["uploads", "add", str(workload)],
        ["uploads", "delete", "ab"],
    ]
    for args in commands:
        result, loaded = koala_without(SERVICE_PACKAGES | {"service", "koala"}, *args, "--url", url)
        assert result.returncode == 2, (args, result.stderr)  # no server there: the client itself got that far
        assert "cannot reach" in result.stderr or url in result.stderr, (args, result.stderr)
        assert loaded == [], args


def test_token_commands_do_not_load_the_optimizer(tmp_path: Path) -> None:
    """Creating a token writes one row: it needs the store, not torch, Ray or Optuna."""
    url = f"sqlite:///{tmp_path / 'koala.db'}"
    env = {"KOALA_DATABASE_URL": url}
    created, loaded = koala_without({"torch", "ray", "optuna", "koala"}, "token", "create", "--name", "ci", env=env)
    assert created.returncode == 0, created.stderr
    assert loaded == ["service"]
    listed, _ = koala_without({"torch", "ray", "optuna", "koala"}, "token", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    assert "ci" in listed.stdout
