"""The `koala` commands that run the service or touch its database: `run` (a JobSpec in this process, no server),
`serve`, `dashboard` and `token`. They import the service when they start, so the rest of the command line needs only
the client (`koala-optim[client]`); without the service's packages they exit 1 saying to install
`koala-optim[service]`."""

from __future__ import annotations

import os
import signal
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import click
from rich.markup import escape
from rich.table import Table

from koala_client.output import console, plot_curves, print_error, print_report, progress, stdout, when

if TYPE_CHECKING:
    from service.store import Store


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
        print_error(f"this command runs the service: install {SERVICE_EXTRA} (missing module: {error.name})")
        sys.exit(1)


@click.command()
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
    with progress() as bars:
        tasks = {
            entry.name: bars.add_task(entry.name, total=spec.trials_of(entry), best="") for entry in spec.optimizers
        }

        def on_event(event: TrialEvent) -> None:
            if event.kind == "epoch" and event.value is not None:
                current = best.get(event.optimizer)
                best[event.optimizer] = event.value if current is None else direction_best(current, event.value)
                bars.update(tasks[event.optimizer], best=f"best {spec.metric_name} {best[event.optimizer]:.4g}")
            elif event.kind == "finished":
                bars.advance(tasks[event.optimizer])

        outcome = run_job(spec, recorder, stop=stop, on_event=on_event)

    report = build_report(recorder.storage, job_id)
    (out_dir / "report.json").write_text(report.model_dump_json(indent=2))
    plot_curves(report.model_dump(), out_dir / "curves.png")
    print_report(report.model_dump())
    console.print(f"report: {out_dir / 'report.json'}, curves: {out_dir / 'curves.png'}")
    if outcome.state != "succeeded":
        console.print(f"[red]job {outcome.state}[/red]" + (f": {outcome.error}" if outcome.error else ""))
        sys.exit(1 if outcome.state == "failed" else 130)


@click.command()
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


@click.command()
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
        print_error(
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


@click.group()
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
        print_error(f"cannot reach the token table in {make_url(url).render_as_string(hide_password=True)}: {error}")
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
            print_error(str(error))
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
        revoked = when(info.revoked_at) if info.revoked_at else ""
        role = "admin" if info.admin else "user"
        allowed = "allowed" if info.allow_uploads else ""
        table.add_row(info.id, escape(info.name), role, allowed, when(info.created_at), revoked)
    stdout().print(table)


@token.command("revoke")
@click.argument("token_ref", metavar="NAME|ID")
def token_revoke(token_ref: str) -> None:
    """Revoke a token: it and its dashboard sessions stop working at once (its jobs are kept)."""
    with _token_store() as store:
        revoked = store.revoke_token(token_ref)
    if revoked is None:
        print_error(f"no token named or with id {token_ref!r} (see `koala token list`)")
        sys.exit(1)
    console.print(f"token {revoked.id} ({escape(revoked.name)}) revoked")


def _stop_on_interrupt(stop: threading.Event) -> None:
    """First Ctrl-C: stop gracefully (running trials end as PRUNED, the report is still written). Second: abort."""
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # ours, not Ray Tune's

    def handler(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        console.print("[yellow]stopping: running trials are closed as PRUNED (Ctrl-C again to abort)[/yellow]")
        stop.set()

    signal.signal(signal.SIGINT, handler)
