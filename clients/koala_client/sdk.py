"""`KoalaClient`: the Python SDK of the KOALA service, a thin typed wrapper over `httpx.Client`.

Every method maps to one endpoint of the HTTP API (docs/architecture.md "HTTP API") and returns the wire models of
`koala_client.models`, so callers get the same types the server validates against. Failures are `KoalaError`s: the
server's problem+json becomes `KoalaAPIError` (with the offending field), an unreachable server becomes
`KoalaConnectionError`.

    with KoalaClient() as client:                      # KOALA_URL / KOALA_TOKEN from the environment
        job = client.submit("examples/digits.yaml")
        job = client.wait(job.id, progress=lambda j: print(j.state, j.trials_done, "/", j.trials_total))
        report = client.results(job.id)

    job = client.submit("job.yaml", workload_dir="./my_workload")  # ships the workload's code with the job
"""

from __future__ import annotations

import builtins
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
import pydantic
import yaml

from koala_client import packing
from koala_client.models import (
    TERMINAL_STATES,
    Event,
    Job,
    JobPage,
    OptimizerInfo,
    Report,
    Trial,
    Upload,
    UploadLimits,
    WorkloadInfo,
)

DEFAULT_URL = "http://127.0.0.1:8000"
EVENT_KINDS = frozenset({"state", "trial", "epoch"})

T = TypeVar("T")

# Validators of the response bodies, built once.
_JOB = pydantic.TypeAdapter(Job)
_JOB_PAGE = pydantic.TypeAdapter(JobPage)
_TRIALS = pydantic.TypeAdapter(list[Trial])
_REPORT = pydantic.TypeAdapter(Report)
_WORKLOADS = pydantic.TypeAdapter(list[WorkloadInfo])
_OPTIMIZERS = pydantic.TypeAdapter(list[OptimizerInfo])
_HEALTH = pydantic.TypeAdapter(dict[str, Any])
_UPLOAD = pydantic.TypeAdapter(Upload)
_UPLOADS = pydantic.TypeAdapter(list[Upload])
_UPLOAD_LIMITS = pydantic.TypeAdapter(UploadLimits)


class KoalaError(Exception):
    """Base of every error the SDK raises."""


class KoalaConnectionError(KoalaError):
    """The server could not be reached (refused, timed out, dropped), wrapping the `httpx.TransportError`."""


class KoalaAPIError(KoalaError):
    """The server answered with a non-2xx status; fields come from its problem+json body (RFC 9457).

    Attributes:
        status: HTTP status code.
        title: short summary of the problem type ("Not Found", "Validation error", ...).
        detail: the server's explanation; the raw body when it was not problem+json.
        field: the offending field of a validation error (e.g. `optimizers[1].params.lr`), else None.
        errors: every offending field of a validation error (dicts with `field` and `message`), else None.
    """

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        field: str | None = None,
        errors: builtins.list[dict[str, str]] | None = None,
    ) -> None:
        self.status = status
        self.title = title
        self.detail = detail
        self.field = field
        self.errors = errors
        super().__init__(f"{detail} (field: {field})" if field else detail)


class KoalaNotFound(KoalaAPIError):  # noqa: N818  (reads as the status it stands for, like KoalaAuthError)
    """404: no such job (or it belongs to another token), or no such endpoint."""


class KoalaAuthError(KoalaAPIError):
    """401/403: the token is missing, unknown or not allowed."""


class KoalaPackError(KoalaError):
    """A workload directory cannot be uploaded as it is (over the server's size limit, a link in it, ...): nothing
    was sent."""


class KoalaClient:
    """Client of one KOALA server.

    Args:
        base_url: the server, e.g. `http://gpu-box:8000`; default `$KOALA_URL`, else `http://127.0.0.1:8000`.
        token: API token sent as `Authorization: Bearer <token>`; default `$KOALA_TOKEN`; none when empty.
        http: an `httpx.Client` to send requests with (FastAPI's `TestClient`, one with a `MockTransport`, custom
            TLS or proxies). It is used as is, its own headers and timeouts included, and `close()` leaves it open
            for its owner. `token` is applied per request. Paths resolve against its own `base_url` unless
            `base_url` is given here (then requests use absolute URLs).
        timeout: seconds to connect, read and write, for the `httpx.Client` made here; event streams use it to
            connect but have no read timeout (a job can be quiet for minutes).

    The client is a context manager; `close()` releases its connections.
    """

    #: Reconnections of an event stream that broke, with exponential backoff starting at `retry_backoff` seconds.
    event_retries = 4
    retry_backoff = 0.5
    #: While following events, the job is re-read at most this often (a replay of a long job is a burst of events).
    refresh_seconds = 0.25

    def __init__(
        self,
        base_url: str | None = None,
        token: str | None = None,
        http: httpx.Client | None = None,
        timeout: float = 30.0,
    ) -> None:
        own_base = str(http.base_url) if http is not None else ""
        if base_url is None and own_base:
            self.base_url = own_base.rstrip("/")
            self._prefix = ""  # relative paths: the injected client adds its base_url
        else:
            self.base_url = (base_url or os.environ.get("KOALA_URL") or DEFAULT_URL).rstrip("/")
            self._prefix = self.base_url
        self._token = token if token is not None else os.environ.get("KOALA_TOKEN") or None
        self._timeout = timeout
        self._owns_http = http is None
        self._http = http if http is not None else httpx.Client(timeout=timeout)

    def __enter__(self) -> KoalaClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool, unless the `httpx.Client` was passed in (its owner closes it)."""
        if self._owns_http:
            self._http.close()

    def __repr__(self) -> str:
        return f"KoalaClient({self.base_url!r})"

    # ---- jobs ------------------------------------------------------------------------------------------------------

    def submit(
        self,
        spec: Mapping[str, Any] | pydantic.BaseModel | str | Path,
        idempotency_key: str | None = None,
        workload_dir: str | Path | None = None,
    ) -> Job:
        """Submit a JobSpec (POST /v1/jobs); the server validates it and queues the job.

        Args:
            spec: the JobSpec as a mapping, a pydantic model, or the path of a YAML or JSON file.
            idempotency_key: retrying with the same key and body returns the job created first instead of a
                duplicate (the same key with another body is a 409).
            workload_dir: a directory holding the workload's code, shipped with the job (see `upload`); the spec
                then names `workload: <directory name>.module:Class`.

        Raises:
            KoalaAPIError: 422 naming the offending field when the spec is invalid.
            KoalaPackError: the workload directory cannot be uploaded (nothing was sent).
            KoalaError: the spec file cannot be read or is not a mapping.
        """
        body = load_spec(spec)
        if workload_dir is not None:
            body["upload"] = self.upload(workload_dir).digest
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return _parse(_JOB, self._request("POST", "/v1/jobs", json=body, headers=headers))

    def get(self, job_id: str) -> Job:
        """The job: spec, state, progress per optimizer, timestamps, error."""
        return _parse(_JOB, self._request("GET", f"/v1/jobs/{quote(job_id, safe='')}"))

    def page(self, state: str | None = None, limit: int = 50, cursor: str | None = None) -> JobPage:
        """One page of jobs, newest first; pass its `next_cursor` as `cursor` for the next."""
        params = {"state": state, "limit": limit, "cursor": cursor}
        return _parse(_JOB_PAGE, self._request("GET", "/v1/jobs", params=params))

    def list(self, state: str | None = None, limit: int = 50) -> Iterator[Job]:
        """Every job (in `state` when given), newest first, fetching pages of `limit` as the iteration goes."""
        cursor: str | None = None
        while True:
            page = self.page(state=state, limit=limit, cursor=cursor)
            yield from page.jobs
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def cancel(self, job_id: str) -> Job:
        """Ask the job to stop (idempotent): the returned job is `cancelling` until its running trials are closed."""
        return _parse(_JOB, self._request("POST", f"/v1/jobs/{quote(job_id, safe='')}/cancel"))

    def trials(self, job_id: str) -> builtins.list[Trial]:
        """Every trial of the job, with its hyperparameters, state and per-epoch metric."""
        return _parse(_TRIALS, self._request("GET", f"/v1/jobs/{quote(job_id, safe='')}/trials"))

    def results(self, job_id: str) -> Report:
        """The comparison report, computed from the trials recorded so far.

        Raises:
            KoalaAPIError: 409 while the job has no recorded trial yet.
        """
        return _parse(_REPORT, self._request("GET", f"/v1/jobs/{quote(job_id, safe='')}/results"))

    # ---- following a job -------------------------------------------------------------------------------------------

    def events(self, job_id: str, after: int | None = None) -> Iterator[Event]:
        """The job's events (state changes, trial changes, per-epoch values) from the server-sent event stream.

        Replays the events after id `after` (all when None), then follows live ones; the iteration ends when the
        job is terminal and every event was delivered. A stream that breaks after it was opened is resumed from
        the last event seen (`Last-Event-ID`), up to `event_retries` times in a row.

        Raises:
            KoalaConnectionError: the server cannot be reached, or the stream keeps breaking.
        """
        return self._events(job_id, after, deadline=None)

    def follow(
        self, job_id: str, poll: float = 1.0, timeout: float | None = None
    ) -> Iterator[tuple[Job, Event | None]]:
        """The job as it changes, each time with the event that changed it, until it is terminal.

        Yields `(job, None)` first (the job as it is), then `(job, event)` per event; the job is re-read after
        state and trial events (at most every `refresh_seconds`, always after a state change), so `job.progress`
        is current. Epoch events carry the new value in `event.data`. When the server's event stream is not
        available the job is polled every `poll` seconds instead, yielding `(job, None)` on every change. The last
        job yielded is terminal.

        Raises:
            TimeoutError: the job is not terminal after `timeout` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        job = self.get(job_id)
        yield job, None
        last_id: int | None = None
        streaming = True
        while job.state not in TERMINAL_STATES:
            if streaming:
                try:
                    stale = False
                    refreshed = time.monotonic()
                    for event in self._events(job_id, last_id, deadline):
                        last_id = event.id
                        if event.kind != "epoch":
                            stale = True
                        if stale and (event.kind == "state" or time.monotonic() - refreshed >= self.refresh_seconds):
                            job, stale, refreshed = self.get(job_id), False, time.monotonic()
                        yield job, event
                        if job.state in TERMINAL_STATES:
                            break  # the server ends the stream now anyway; do not hang on one that does not
                        if deadline is not None and time.monotonic() >= deadline:
                            raise TimeoutError(f"job {job_id} still running at the timeout")
                except KoalaConnectionError:
                    streaming = False  # the stream kept breaking; if the server is gone, the read below says so
                except KoalaAPIError as error:
                    if error.status not in (404, 405, 501):
                        raise
                    streaming = False  # no event stream here; a job that is gone raises KoalaNotFound below
                if job.state in TERMINAL_STATES:
                    return
            previous = job
            job = self.get(job_id)
            if job != previous:
                yield job, None
            if job.state not in TERMINAL_STATES:
                # The stream ended early (server shutting down) or is unavailable: wait before the next try.
                _sleep_until(poll, deadline, job_id)

    def wait(
        self,
        job_id: str,
        progress: Callable[[Job], None] | None = None,
        poll: float = 1.0,
        timeout: float | None = None,
    ) -> Job:
        """Block until the job is terminal (succeeded, failed or cancelled) and return it.

        Args:
            progress: called with the job whenever its state or progress changed (see `follow`).
            poll: seconds between reads when the event stream is unavailable.
            timeout: give up after this many seconds (TimeoutError); None waits as long as the job runs.
        """
        last: Job | None = None
        for job, _event in self.follow(job_id, poll=poll, timeout=timeout):
            if progress is not None and job != last:
                progress(job)
            last = job
        assert last is not None  # follow always yields the job at least once
        return last

    # ---- uploaded workloads --------------------------------------------------------------------------------------

    def upload_limits(self) -> UploadLimits:
        """Whether this token may upload workload code, and the limits a pack keeps to (the defaults for a server
        that does not say)."""
        try:
            return _parse(_UPLOAD_LIMITS, self._request("GET", "/v1/uploads/limits"))
        except KoalaNotFound:
            return UploadLimits(
                allowed=True,
                max_bytes=packing.DEFAULT_MAX_BYTES,
                max_files=packing.DEFAULT_MAX_FILES,
                max_unpacked_bytes=packing.DEFAULT_MAX_UNPACKED_BYTES,
                package_installs=False,
            )

    def pack(self, source: str | Path) -> packing.Pack:
        """Pack a workload directory (or take a .zip archive) for this server, within its limits.

        Raises:
            KoalaAuthError: 403, this token may not upload code (the message says how an operator allows it).
            KoalaPackError: the pack would be over the server's limits, or the directory holds a link.
        """
        limits = self.upload_limits()
        if not limits.allowed:
            raise KoalaAuthError(403, "Uploads not allowed", limits.detail or "this token may not upload code")
        try:
            return packing.pack(
                source,
                max_bytes=limits.max_bytes,
                max_files=limits.max_files,
                max_unpacked_bytes=limits.max_unpacked_bytes,
            )
        except (packing.PackError, OSError) as error:
            raise KoalaPackError(str(error)) from error

    def upload_pack(self, pack: packing.Pack) -> tuple[Upload, bool]:
        """Store a pack on the server (POST /v1/uploads), unless this token holds the same bytes already; returns
        the upload and whether the pack was sent."""
        try:
            return self.get_upload(pack.digest), False
        except KoalaNotFound:
            pass
        response = self._request("POST", "/v1/uploads", content=pack.data, headers={"Content-Type": "application/zip"})
        return _parse(_UPLOAD, response), True

    def upload(self, source: str | Path) -> Upload:
        """Pack a workload directory and store it on the server (see `pack`, `upload_pack`); a JobSpec names the
        returned upload's `digest` as its `upload`, and `workload: <directory name>.module:Class`."""
        upload, _ = self.upload_pack(self.pack(source))
        return upload

    def uploads(self) -> builtins.list[Upload]:
        """This token's uploads, newest first (without their file lists)."""
        return _parse(_UPLOADS, self._request("GET", "/v1/uploads"))

    def get_upload(self, digest: str) -> Upload:
        """One upload of this token, with its file list."""
        return _parse(_UPLOAD, self._request("GET", f"/v1/uploads/{quote(digest, safe=':')}"))

    def delete_upload(self, digest: str) -> None:
        """Delete an upload of this token (409 while a queued or running job needs it)."""
        self._request("DELETE", f"/v1/uploads/{quote(digest, safe=':')}")

    # ---- catalogue and health --------------------------------------------------------------------------------------

    def workloads(self) -> builtins.list[WorkloadInfo]:
        """The workloads a job can name, with their metrics and configuration defaults."""
        return _parse(_WORKLOADS, self._request("GET", "/v1/workloads"))

    def optimizers(self) -> builtins.list[OptimizerInfo]:
        """The optimizers a job can name, with their hyperparameters and defaults."""
        return _parse(_OPTIMIZERS, self._request("GET", "/v1/optimizers"))

    def health(self) -> dict[str, Any]:
        """GET /healthz: liveness of the API process."""
        return _parse(_HEALTH, self._request("GET", "/healthz"))

    # ---- transport -------------------------------------------------------------------------------------------------

    def _headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers = dict(extra or {})
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        return headers

    def _connection_error(self, error: httpx.TransportError) -> KoalaConnectionError:
        return KoalaConnectionError(
            f"cannot reach the KOALA server at {self.base_url} ({str(error) or type(error).__name__}); "
            "start one with `koala serve`, or point KOALA_URL at a running one"
        )

    def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        content: bytes | None = None,
    ) -> httpx.Response:
        query = {key: value for key, value in (params or {}).items() if value is not None}
        try:
            response = self._http.request(
                method,
                self._prefix + path,
                json=json,
                params=query,
                headers=self._headers(headers),
                content=content,
            )
        except httpx.TransportError as error:
            raise self._connection_error(error) from error
        if response.is_error:
            raise api_error(response)
        return response

    @contextmanager
    def _stream(self, path: str, headers: Mapping[str, str], read_timeout: float | None) -> Iterator[httpx.Response]:
        timeout = httpx.Timeout(self._timeout, read=read_timeout)
        with self._http.stream("GET", self._prefix + path, headers=self._headers(headers), timeout=timeout) as response:
            if response.is_error:
                response.read()
                raise api_error(response)
            yield response

    def _events(self, job_id: str, after: int | None, deadline: float | None) -> Iterator[Event]:
        last_id = after
        connected = False
        failures = 0
        while True:
            headers = {"Accept": "text/event-stream"}
            if last_id is not None:
                headers["Last-Event-ID"] = str(last_id)
            read_timeout = None if deadline is None else max(deadline - time.monotonic(), 0.001)
            try:
                with self._stream(f"/v1/jobs/{quote(job_id, safe='')}/events", headers, read_timeout) as response:
                    connected = True
                    for sse_id, event in parse_sse(response.iter_lines()):
                        failures = 0
                        last_id = sse_id if sse_id is not None else event.id
                        yield event
                return
            except httpx.TransportError as error:
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"job {job_id} still running at the timeout") from error
                failures += 1
                if not connected or failures > self.event_retries:
                    raise self._connection_error(error) from error
                time.sleep(self.retry_backoff * 2 ** (failures - 1))


def _parse(adapter: pydantic.TypeAdapter[T], response: httpx.Response) -> T:
    """The validated body of a 2xx response; a body that does not fit means a server of another version."""
    try:
        return adapter.validate_json(response.content)
    except pydantic.ValidationError as error:
        raise KoalaError(
            f"unexpected response from {response.request.method} {response.request.url} "
            f"(is the server another version?): {error}"
        ) from error


def load_spec(spec: Mapping[str, Any] | pydantic.BaseModel | str | Path) -> dict[str, Any]:
    """A JobSpec as the JSON object to send: a mapping as is, a model dumped, a file path read as JSON or YAML."""
    if isinstance(spec, pydantic.BaseModel):
        return spec.model_dump(mode="json", by_alias=True, exclude_unset=True)
    if isinstance(spec, Mapping):
        return dict(spec)
    path = Path(spec)
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as error:
        raise KoalaError(f"cannot read job spec {str(path)!r}: {error}") from error
    if not isinstance(data, dict):
        raise KoalaError(f"job spec {str(path)!r} must be a mapping (YAML or JSON object), not {type(data).__name__}")
    return data


def api_error(response: httpx.Response) -> KoalaAPIError:
    """The `KoalaAPIError` (or its 404/401/403 subclass) for an error response, from problem+json when it is."""
    status = response.status_code
    title = response.reason_phrase or f"HTTP {status}"
    detail = response.text.strip() or title
    field: str | None = None
    errors: list[dict[str, str]] | None = None
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        title = str(body.get("title") or title)
        raw_detail = body.get("detail")
        if isinstance(raw_detail, str):
            detail = raw_detail
        elif isinstance(raw_detail, list):  # FastAPI's default validation body: a list of errors
            detail = "; ".join(
                str(item.get("msg", item)) if isinstance(item, dict) else str(item) for item in raw_detail
            )
        field = body.get("field") if isinstance(body.get("field"), str) else None
        if isinstance(body.get("errors"), list):
            errors = [{str(k): str(v) for k, v in item.items()} for item in body["errors"] if isinstance(item, dict)]
    cls = KoalaNotFound if status == 404 else KoalaAuthError if status in (401, 403) else KoalaAPIError
    return cls(status, title, detail, field, errors)


def parse_sse(lines: Iterable[str]) -> Iterator[tuple[int | None, Event]]:
    """Server-sent events (`id:`, `event:`, `data:` fields, a blank line ends one) as (id, Event) pairs.

    Comment lines (`:` first, the server's keep-alives) and fields other than id/event/data are ignored, as are
    event types this SDK does not know (a newer server may add some). An event cut off by the end of the stream
    is dropped, as the SSE specification says; a reconnection with `Last-Event-ID` gets it again.
    """
    sse_id: str | None = None
    kind = ""
    data: list[str] = []
    for raw in lines:
        line = raw.rstrip("\r\n")
        if not line:
            if data and kind in ("", "message", *EVENT_KINDS):
                try:
                    event = Event.model_validate_json("\n".join(data))
                except pydantic.ValidationError as error:
                    raise KoalaError(f"malformed event from the server: {error}") from error
                yield (int(sse_id) if sse_id and sse_id.isdigit() else None), event
            sse_id, kind, data = None, "", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        elif name == "event":
            kind = value
        elif name == "id":
            sse_id = value


def _sleep_until(seconds: float, deadline: float | None, job_id: str) -> None:
    if deadline is not None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"job {job_id} still running at the timeout")
        seconds = min(seconds, remaining)
    time.sleep(seconds)
