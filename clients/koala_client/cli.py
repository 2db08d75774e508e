"""The `koala` command line.

`koala run job.yaml` executes a JobSpec in this process (no server) through the engine the service uses, with live
progress, then prints the report and writes it as JSON plus a PNG of the learning curves. `koala serve` runs the
service; the other commands talk to it through the SDK (`KoalaClient`), reading KOALA_URL and KOALA_TOKEN.

The commands that talk to a server need only the client (`koala-optim[client]`): this module imports nothing from
`service` or `koala` at module level. The commands that run the service (`run`, `serve`, `dashboard`, `token`) import
it when they start, and without its packages exit 1 saying to install `koala-optim[service]`.

Machine-readable output (job ids, states, tokens, tables, JSON) goes to stdout, messages and progress to stderr, so
`JOB=$(koala submit job.yaml)` works. Exit codes: 0 success, 1 an error from the server (or a failed job, or the
service not installed), 2 the server cannot be reached, 3 the watched job was cancelled, 130 interrupted.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import signal
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from koala_client.models import JOB_STATES, Job, Upload
from koala_client.sdk import KoalaClient, KoalaConnectionError, KoalaError, KoalaNotFound, load_spec

if TYPE_CHECKING:
    from service.store import Store

console = Console(stderr=True, highlight=False)


def stdout() -> Console:
    """Where tables go: the terminal's width, or 160 columns when stdout is a file or pipe (rich would use 80)."""
    out = Console()
    return out if out.is_terminal else Console(width=160)


def default_data_dir() -> Path:
    """Where jobs keep their database and outputs: $KOALA_DATA_DIR, else ~/.koala."""
    return Path(os.environ.get("KOALA_DATA_DIR") or Path.home() / ".koala").expanduser()


SERVICE_EXTRA = "koala-optim[service]"


@contextmanager
def service_imports() -> Iterator[None]:
    """Around the imports of a command that runs the service: a missing package (a client-only install) becomes one
    line naming it and the extra to install, and exit code 1, instead of a traceback. Only the imports are inside, so
    a module missing later (a user's workload, say) still raises as itself."""
    try:
        yield
    except ModuleNotFoundError as error:
        _error(f"this command runs the service: install {SERVICE_EXTRA} (missing module: {error.name})")
        sys.exit(1)


@click.group()
def main() -> None:
    """KOALA: compare the hyperparameter-free KOALA optimizer with tuned baselines."""


@main.command()
@click.argument("spec_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--db", "database_url", help="Database URL for the Optuna studies [default: SQLite in the data dir]")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), help="Where to write the report")
@click.option("--job-id", help="Job id (studies are named job-{id}/{optimizer}) [default: a new random id]")
def run(spec_file: Path, database_url: str | None, out_dir: Path | None, job_id: str | None) -> None:
    """Run the comparison in SPEC_FILE (YAML or JSON) here, without a server."""
    with service_imports():
        from service.engine import TrialEvent, run_job
        from service.jobspec import SpecError, load_jobspec
        from service.recorder import Recorder, storage_for
        from service.report import build_report

    try:
        spec = load_jobspec(spec_file)
    except SpecError as error:
        for item in error.errors:
            console.print(f"[red]invalid job spec[/red] {item['field'] or '(spec)'}: {item['message']}")
        sys.exit(2)
    data_dir = default_data_dir()
    data_dir.mkdir(parents=True, exist_ok=True)
    database_url = database_url or f"sqlite:///{data_dir / 'koala.db'}"
    job_id = job_id or uuid.uuid4().hex[:12]
    out_dir = out_dir or data_dir / "runs" / job_id
    out_dir.mkdir(parents=True, exist_ok=True)
    recorder = Recorder(storage_for(database_url), job_id, spec)
    console.print(
        f"job [bold]{job_id}[/bold]: {spec.planned_trials()} trials of {spec.workload}, studies in {database_url}"
    )

    stop = threading.Event()
    _stop_on_interrupt(stop)
    direction_best = max if spec.direction == "maximize" else min
    best: dict[str, float] = {}
    with _progress() as progress:
        tasks = {
            entry.name: progress.add_task(entry.name, total=spec.trials_of(entry), best="") for entry in spec.optimizers
        }

        def on_event(event: TrialEvent) -> None:
            if event.kind == "epoch" and event.value is not None:
                current = best.get(event.optimizer)
                best[event.optimizer] = event.value if current is None else direction_best(current, event.value)
                progress.update(tasks[event.optimizer], best=f"best {spec.metric_name} {best[event.optimizer]:.4g}")
            elif event.kind == "finished":
                progress.advance(tasks[event.optimizer])

        outcome = run_job(spec, recorder, stop=stop, on_event=on_event)

    report = build_report(recorder.storage, job_id)
    (out_dir / "report.json").write_text(report.model_dump_json(indent=2))
    plot_curves(report.model_dump(), out_dir / "curves.png")
    print_report(report.model_dump())
    console.print(f"report: {out_dir / 'report.json'}, curves: {out_dir / 'curves.png'}")
    if outcome.state != "succeeded":
        console.print(f"[red]job {outcome.state}[/red]" + (f": {outcome.error}" if outcome.error else ""))
        sys.exit(1 if outcome.state == "failed" else 130)


# ---- commands that talk to a server -------------------------------------------------------------------------------


def make_client(url: str | None, token: str | None) -> KoalaClient:
    """The SDK client of every server command; the one seam tests replace to point the CLI at a fake server."""
    return KoalaClient(base_url=url, token=token)


def _error(message: str) -> None:
    # One line, however long: the terminal wraps it, and a log or `grep` gets it whole.
    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)


@contextmanager
def exit_on_error() -> Iterator[None]:
    """SDK errors as one line on stderr and an exit code (1: the server said no, 2: no server), no traceback."""
    try:
        yield
    except KoalaConnectionError as error:
        _error(str(error))
        sys.exit(2)
    except KoalaError as error:  # KoalaAPIError: its detail names every offending field
        _error(str(error))
        sys.exit(1)


def server_command(func: Callable[..., None]) -> Callable[..., None]:
    """Give a command `--url` and `--token`, call it with a `KoalaClient` first, and exit cleanly on SDK errors."""

    @click.option(
        "--url",
        envvar="KOALA_URL",
        metavar="URL",
        help="The server  [env var: KOALA_URL; default: http://127.0.0.1:8000]",
    )
    @click.option("--token", envvar="KOALA_TOKEN", metavar="TOKEN", help="API token  [env var: KOALA_TOKEN]")
    @functools.wraps(func)
    def command(url: str | None, token: str | None, **kwargs: Any) -> None:
        with exit_on_error(), make_client(url, token) as client:
            func(client, **kwargs)

    return command


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, envvar="KOALA_HOST", help="Address to bind")
@click.option(
    "--port",
    default=8000,
    show_default=True,
    envvar="KOALA_PORT",
    type=click.IntRange(1, 65535),
    help="Port to listen on",
)
@click.option(
    "--workers",
    default=1,
    show_default=True,
    envvar="KOALA_WORKERS",
    type=click.IntRange(1, 64),
    help="API processes (each also schedules; they coordinate through the database)",
)
def serve(host: str, port: int, workers: int) -> None:
    """Run the API server and the job scheduler until interrupted.

    Bound to anything but loopback it needs API tokens (`koala token create`), and refuses to start without.
    """
    with service_imports():
        from service.app import serve as serve_app

    serve_app(host=host, port=port, workers=workers)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback only)")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(1, 65535))
def dashboard(host: str, port: int) -> None:
    """Run optuna-dashboard alone on the service's database (KOALA_DATABASE_URL): every job's studies.

    It has no login of its own, so it binds loopback addresses only. `koala serve` also serves it, at /optuna, behind
    the API's tokens.
    """
    with service_imports():
        import optuna_dashboard
        import uvicorn
        from a2wsgi import WSGIMiddleware
        from sqlalchemy.engine import make_url

        from service.auth import is_loopback
        from service.recorder import storage_for
        from service.settings import Settings

    if not is_loopback(host):
        _error(
            f"refusing to serve optuna-dashboard on {host}: it has no authentication, so anyone reaching it could "
            "read (and change) every job's studies. Bind 127.0.0.1, or use `koala serve`, which serves it at "
            "/optuna behind the API's tokens."
        )
        sys.exit(1)
    url = Settings().database_url
    app = WSGIMiddleware(optuna_dashboard.wsgi(storage_for(url)))
    shown = f"[{host}]" if ":" in host else host
    console.print(f"optuna-dashboard for {make_url(url).render_as_string(hide_password=True)}")
    click.echo(f"http://{shown}:{port}/dashboard", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


@main.command()
@click.argument("spec_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--idempotency-key", metavar="KEY", help="Retrying with the same key returns the first job, not a new one"
)
@click.option("--watch", is_flag=True, help="Then follow the job like `koala watch`")
@click.option(
    "--workload-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Ship this directory's code with the job; the spec names `workload: <directory name>.module:Class`",
)
@server_command
def submit(
    client: KoalaClient, spec_file: Path, idempotency_key: str | None, watch: bool, workload_dir: Path | None
) -> None:
    """Submit the comparison in SPEC_FILE (YAML or JSON) to the server; prints the job id.

    With --workload-dir, the directory is packed (without .git, __pycache__, virtual environments and what its
    .koalaignore lists), uploaded unless the server holds the same pack already, and the job runs that code on the
    server's Ray nodes.
    """
    if workload_dir is None:
        job = client.submit(spec_file, idempotency_key=idempotency_key)
    else:
        body = load_spec(spec_file)
        body["upload"] = _upload(client, workload_dir).digest
        job = client.submit(body, idempotency_key=idempotency_key)
    click.echo(job.id)
    console.print(f"submitted job {job.id} ({escape(job.name)}): {job.trials_total} trials of {job.workload}")
    if watch:
        sys.exit(_watch(client, job.id))
    console.print(f"follow it with `koala watch {job.id}`")


@main.command()
@click.option("--state", type=click.Choice(JOB_STATES), help="Only jobs in this state")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(min=1), help="Show at most this many")
@server_command
def jobs(client: KoalaClient, state: str | None, limit: int) -> None:
    """List jobs, newest first."""
    table = Table("id", "name", "workload", "state", "trials", "created")
    for job in itertools.islice(client.list(state=state, limit=min(limit, 200)), limit):
        table.add_row(
            job.id,
            escape(job.name),
            job.workload,
            _state(job.state),
            f"{job.trials_done}/{job.trials_total}",
            _when(job.created_at),
        )
    if table.row_count:
        stdout().print(table)
    else:
        console.print("no jobs" + (f" in state {state}" if state else ""))


@main.command()
@click.argument("job_id")
@server_command
def watch(client: KoalaClient, job_id: str) -> None:
    """Follow a job with a progress bar per optimizer until it ends; then print its report.

    Exits 0 when the job succeeded, 1 when it failed, 3 when it was cancelled.
    """
    sys.exit(_watch(client, job_id))


@main.command()
@click.argument("job_id")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), help="Also write the curves as this PNG")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of a table")
@server_command
def results(client: KoalaClient, job_id: str, plot: Path | None, as_json: bool) -> None:
    """Print the comparison report of a job (from the trials recorded so far while it runs)."""
    report = client.results(job_id)
    if as_json:
        click.echo(report.model_dump_json(indent=2))
    else:
        print_report(report.model_dump())
    if plot is not None:
        plot_curves(report.model_dump(), plot)
        console.print(f"curves: {plot}")


@main.command()
@click.argument("job_id")
@server_command
def cancel(client: KoalaClient, job_id: str) -> None:
    """Cancel a job (idempotent); prints its new state. Running trials are stopped and recorded as pruned."""
    click.echo(client.cancel(job_id).state)


@main.command()
@server_command
def workloads(client: KoalaClient) -> None:
    """List the workloads a job can name, with their metric and configuration defaults."""
    table = Table("name", "metric", "config defaults", "description")
    for info in client.workloads():
        config = ", ".join(f"{key}={value}" for key, value in info.config.items())
        table.add_row(info.name, f"{info.metric} ({info.mode})", escape(config), escape(info.description))
    stdout().print(table)


@main.command()
@server_command
def optimizers(client: KoalaClient) -> None:
    """List the optimizers a job can name, with their hyperparameters and defaults."""
    table = Table("name", "hyperparameters (defaults)", "description")
    for info in client.optimizers():
        params = ", ".join(f"{p.name}={p.default}" for p in info.hyperparameters)
        table.add_row(info.name, escape(params), escape(info.description))
    stdout().print(table)


def _upload(client: KoalaClient, source: Path) -> Upload:
    """Pack and upload a workload directory (or a .zip archive), saying what was sent on stderr."""
    pack = client.pack(source)
    upload, sent = client.upload_pack(pack)
    how = "uploaded" if sent else "already on the server"
    what = f"{len(pack.files)} files, {_size(pack.size)}"
    console.print(f"workload {escape(str(source))}: {what}, {how} ({upload.digest})")
    return upload


def _size(size: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if size < 1024 or unit == "MiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} MiB"


@main.group()
def uploads() -> None:
    """Workload code uploaded with jobs (`koala submit --workload-dir`). An upload is deleted with its last job,
    after the server's retention period."""


@uploads.command("list")
@server_command
def uploads_list(client: KoalaClient) -> None:
    """List this token's uploads, newest first."""
    table = Table("digest", "files", "size", "jobs", "uploaded", "last used")
    for upload in client.uploads():
        table.add_row(
            upload.digest,
            str(upload.file_count),
            _size(upload.size),
            str(upload.jobs),
            _when(upload.created_at),
            _when(upload.last_used_at),
        )
    if table.row_count:
        stdout().print(table)
    else:
        console.print("no uploads")


@uploads.command("show")
@click.argument("digest")
@server_command
def uploads_show(client: KoalaClient, digest: str) -> None:
    """List the files of an upload (DIGEST: `sha256:...`, or a unique start of it)."""
    upload = client.get_upload(_digest(client, digest))
    table = Table("file", "size", title=upload.digest)
    for item in upload.files or []:
        table.add_row(escape(item.path), _size(item.size))
    stdout().print(table)
    if upload.requirements:
        console.print(f"requirements: {escape(', '.join(upload.requirements))}")


@uploads.command("add")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@server_command
def uploads_add(client: KoalaClient, source: Path) -> None:
    """Upload a workload directory (or a .zip archive) without submitting a job; prints its digest, which a JobSpec
    names as `upload`."""
    click.echo(_upload(client, source).digest)


@uploads.command("delete")
@click.argument("digest")
@server_command
def uploads_delete(client: KoalaClient, digest: str) -> None:
    """Delete an upload now (DIGEST: `sha256:...`, or a unique start of it); refused while a queued or running job
    needs it."""
    full = _digest(client, digest)
    client.delete_upload(full)
    console.print(f"upload {full} deleted")


def _digest(client: KoalaClient, given: str) -> str:
    """The full digest of this token's upload that `given` names (the digest, or a unique start of its hex)."""
    prefix = given.strip().lower().removeprefix("sha256:")
    if len(prefix) == 64:
        return f"sha256:{prefix}"
    matches = [u.digest for u in client.uploads() if u.digest.removeprefix("sha256:").startswith(prefix)]
    if len(matches) == 1 and prefix:
        return matches[0]
    if not matches or not prefix:
        raise KoalaNotFound(404, "Not Found", f"no upload starts with {given!r} (see `koala uploads list`)")
    raise KoalaError(f"{given!r} is the start of {len(matches)} uploads; give more of the digest")


@main.group()
def token() -> None:
    """API tokens. They are written to the server's database directly, so run this where `koala serve` runs."""


@contextmanager
def _token_store() -> Iterator[Store]:
    """The server's store, migrated (the first token may come before the first `koala serve`); database errors
    exit with a message naming the database."""
    with service_imports():  # the store and the settings only: no torch, Ray or Optuna for one row
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import SQLAlchemyError

        from service.settings import Settings
        from service.store import Store

    url = Settings().database_url
    try:
        store = Store(url)
        try:
            store.migrate()
            yield store
        finally:
            store.close()
    except SQLAlchemyError as error:
        _error(f"cannot reach the token table in {make_url(url).render_as_string(hide_password=True)}: {error}")
        sys.exit(1)


@token.command("create")
@click.option("--name", default="", help="A unique label to recognise the token by  [default: token-<id>]")
@click.option("--admin", is_flag=True, help="Also see (and cancel) the jobs created while the server ran open")
@click.option(
    "--allow-uploads",
    is_flag=True,
    help="May upload workload code, which runs on the Ray cluster (without it, only where KOALA_ALLOW_UPLOADS=true)",
)
def token_create(name: str, admin: bool, allow_uploads: bool) -> None:
    """Create an API token and print it (once: only its hash is stored)."""
    with _token_store() as store:
        try:
            created = store.create_token(name, admin=admin, allow_uploads=allow_uploads)
        except ValueError as error:
            _error(str(error))
            sys.exit(1)
    click.echo(created.token)
    role = "admin token" if created.admin else "token"
    role += " that may upload code" if created.allow_uploads else ""
    console.print(
        f"{role} {created.id} ({escape(created.name)}) created; it is shown only this once. "
        "Clients use it with: export KOALA_TOKEN=<the token>"
    )


@token.command("list")
def token_list() -> None:
    """List the API tokens (never the tokens themselves: only their hashes are stored)."""
    with _token_store() as store:
        tokens = store.list_tokens()
    table = Table("id", "name", "role", "uploads", "created", "revoked")
    for info in tokens:
        revoked = _when(info.revoked_at) if info.revoked_at else ""
        role = "admin" if info.admin else "user"
        allowed = "allowed" if info.allow_uploads else ""
        table.add_row(info.id, escape(info.name), role, allowed, _when(info.created_at), revoked)
    stdout().print(table)


@token.command("revoke")
@click.argument("token_ref", metavar="NAME|ID")
def token_revoke(token_ref: str) -> None:
    """Revoke a token: it and its dashboard sessions stop working at once (its jobs are kept)."""
    with _token_store() as store:
        revoked = store.revoke_token(token_ref)
    if revoked is None:
        _error(f"no token named or with id {token_ref!r} (see `koala token list`)")
        sys.exit(1)
    console.print(f"token {revoked.id} ({escape(revoked.name)}) revoked")


def _watch(client: KoalaClient, job_id: str) -> int:
    """Live progress of a job until it is terminal, then its report or error; returns the exit code."""
    metric, mode = "", None
    best: dict[str, float] = {}
    state = ""
    try:
        with _progress() as progress:
            tasks: dict[str, TaskID] = {}
            for job, event in client.follow(job_id):
                if not tasks:
                    metric, mode = _metric_of(client, job)
                for name in job.optimizers:
                    done = job.progress.get(name)
                    if name not in tasks:
                        tasks[name] = progress.add_task(name, total=done.total if done else None, best="")
                    if done is not None:
                        progress.update(tasks[name], completed=done.done, total=done.total)
                if event is not None and event.kind == "epoch":
                    updated = _update_best(best, event.data, mode)
                    if updated in tasks:
                        label = "best" if mode else "last"
                        progress.update(tasks[updated], best=f"{label} {metric} {best[updated]:.4g}")
                if job.state != state:
                    state = job.state
                    console.print(f"job {job.id} ({escape(job.name)}): {_state(state)}")
    except KeyboardInterrupt:
        console.print(f"stopped watching; job {job_id} goes on (`koala cancel {job_id}` stops it)")
        return 130
    return _outcome(client, job)


def _outcome(client: KoalaClient, job: Job) -> int:
    if job.state == "succeeded":
        print_report(client.results(job.id).model_dump())
        return 0
    reason = f": {job.error}" if job.error else ""
    if job.state == "cancelled":
        console.print(f"[yellow]job {job.id} cancelled[/yellow]{escape(reason)}")
        return 3
    _error(f"job {job.id} {job.state}{reason}")
    return 1


def _metric_of(client: KoalaClient, job: Job) -> tuple[str, str | None]:
    """The job's metric and its direction (max/min), None when the server does not know the workload."""
    metric = job.spec.get("metric")
    try:
        info = next((w for w in client.workloads() if w.name == job.workload), None)
    except KoalaError:
        info = None
    if info is None:
        return str(metric or "metric"), None
    metric = str(metric or info.metric)
    return metric, info.metrics.get(metric)


def _update_best(best: dict[str, float], data: dict[str, Any], mode: str | None) -> str | None:
    """Fold an epoch event's value into its optimizer's best (the latest when the direction is unknown); returns
    the optimizer, None when the event has no usable value (NaN: a diverged trial)."""
    name, value = data.get("optimizer"), data.get("value")
    if not isinstance(name, str) or not isinstance(value, int | float) or math.isnan(value):
        return None
    current = best.get(name)
    if current is None or mode is None:
        best[name] = value
    else:
        best[name] = max(current, value) if mode == "max" else min(current, value)
    return name


STATE_STYLES = {"succeeded": "green", "failed": "red", "cancelled": "yellow", "cancelling": "yellow", "running": "cyan"}


def _state(state: str) -> str:
    style = STATE_STYLES.get(state)
    return f"[{style}]{state}[/{style}]" if style else state


def _when(moment: datetime) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M")


# ---- helpers shared by run and the server commands ----------------------------------------------------------------


def _stop_on_interrupt(stop: threading.Event) -> None:
    """First Ctrl-C: stop gracefully (running trials end as PRUNED, the report is still written). Second: abort."""
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # ours, not Ray Tune's

    def handler(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        console.print("[yellow]stopping: running trials are closed as PRUNED (Ctrl-C again to abort)[/yellow]")
        stop.set()

    signal.signal(signal.SIGINT, handler)


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description:<22}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[best]}"),
        TimeElapsedColumn(),
        console=console,
    )


def print_report(report: dict[str, Any]) -> None:
    """The report as a table on stdout, best first."""
    table = Table(title=f"{report['metric']} ({report['direction']}), job {report['job_id']}")
    for column in (
        "rank",
        "optimizer",
        "mode",
        "final mean",
        "std",
        "min",
        "max",
        "trials",
        "compute s",
        "hyperparams",
    ):
        table.add_column(column, justify="right" if column not in ("optimizer", "mode", "hyperparams") else "left")
    order = {name: i for i, name in enumerate(report["ranking"])}
    rows = sorted(report["optimizers"], key=lambda r: order.get(r["optimizer"], len(order)))
    for row in rows:
        rank = order.get(row["optimizer"])
        table.add_row(
            str(rank + 1) if rank is not None else "-",
            row["optimizer"],
            row["mode"],
            *(_fmt(row[k]) for k in ("final_mean", "final_std", "final_min", "final_max")),
            ", ".join(f"{k}:{v}" for k, v in sorted(row["trials"].items())),
            f"{row['compute_seconds']:.1f}",
            json.dumps(row["hyperparams"]) if row["hyperparams"] else "defaults",
        )
    stdout().print(table)
    for cost in report["hpo_cost"]:
        if cost["matched"]:
            text = (
                f"{cost['optimizer']} matched {cost['koala_optimizer']} ({cost['koala_result']:.4g}) after "
                f"{cost['tuning_trials_to_match']} tuning trials: HPO cost ratio {cost['ratio']:.1f}x"
            )
        else:
            text = (
                f"{cost['optimizer']} never matched {cost['koala_optimizer']} ({cost['koala_result']:.4g}) while "
                f"tuning: HPO cost ratio > {cost['ratio_lower_bound'] or 0:.1f}x"
            )
        stdout().print(text)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def plot_curves(report: dict[str, Any], path: Path) -> None:
    """Mean +/- std over seeds of the metric per epoch, one line per optimizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for row in report["optimizers"]:
        curve = row["curve"]
        if not curve:
            continue
        epochs = [p["epoch"] for p in curve]
        mean = [p["mean"] for p in curve]
        std = [p["std"] for p in curve]
        (line,) = axes.plot(epochs, mean, marker="o", markersize=3, label=f"{row['optimizer']} ({row['mode']})")
        axes.fill_between(
            epochs, [m - s for m, s in zip(mean, std, strict=True)], [m + s for m, s in zip(mean, std, strict=True)],
            color=line.get_color(), alpha=0.2,
        )  # fmt: skip
    axes.set_xlabel("epoch")
    axes.set_ylabel(report["metric"])
    axes.set_title(f"job {report['job_id']}: mean +/- std over seeds")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
