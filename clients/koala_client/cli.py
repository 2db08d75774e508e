"""The `koala` command line.

`koala serve` runs the service and `koala run job.yaml` executes a JobSpec in this process without a server
(service_commands.py, with `dashboard` and `token`); the other commands, here, talk to a server through the SDK
(`KoalaClient`), reading KOALA_URL and KOALA_TOKEN.

The commands that talk to a server need only the client (`koala-optim[client]`): nothing here imports `service` or
`koala`. The commands that run the service import it when they start, and without its packages exit 1 saying to
install `koala-optim[service]`.

Machine-readable output (job ids, states, tokens, tables, JSON) goes to stdout, messages and progress to stderr, so
`JOB=$(koala submit job.yaml)` works. Exit codes: 0 success, 1 an error from the server (or a failed job, or the
service not installed), 2 the server cannot be reached, 3 the watched job was cancelled, 130 interrupted.
"""

from __future__ import annotations

import functools
import itertools
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.progress import TaskID
from rich.table import Table

from koala_client import service_commands
from koala_client.models import JOB_STATES, Job, Upload
from koala_client.output import console, plot_curves, print_error, print_report, progress, state_label, stdout, when
from koala_client.sdk import KoalaClient, KoalaConnectionError, KoalaError, KoalaNotFound, load_spec


@click.group()
def main() -> None:
    """KOALA: compare the hyperparameter-free KOALA optimizer with tuned baselines."""


for command in (service_commands.run, service_commands.serve, service_commands.dashboard, service_commands.token):
    main.add_command(command)


# ---- commands that talk to a server -------------------------------------------------------------------------------


def make_client(url: str | None, token: str | None) -> KoalaClient:
    """The SDK client of every server command; the one seam tests replace to point the CLI at a fake server."""
    return KoalaClient(base_url=url, token=token)


@contextmanager
def exit_on_error() -> Iterator[None]:
    """SDK errors as one line on stderr and an exit code (1: the server said no, 2: no server), no traceback."""
    try:
        yield
    except KoalaConnectionError as error:
        print_error(str(error))
        sys.exit(2)
    except KoalaError as error:  # KoalaAPIError: its detail names every offending field
        print_error(str(error))
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
            state_label(job.state),
            f"{job.trials_done}/{job.trials_total}",
            when(job.created_at),
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
            when(upload.created_at),
            when(upload.last_used_at),
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


def _watch(client: KoalaClient, job_id: str) -> int:
    """Live progress of a job until it is terminal, then its report or error; returns the exit code."""
    metric, mode = "", None
    best: dict[str, float] = {}
    state = ""
    try:
        with progress() as bars:
            tasks: dict[str, TaskID] = {}
            for job, event in client.follow(job_id):
                if not tasks:
                    metric, mode = _metric_of(client, job)
                for name in job.optimizers:
                    done = job.progress.get(name)
                    if name not in tasks:
                        tasks[name] = bars.add_task(name, total=done.total if done else None, best="")
                    if done is not None:
                        bars.update(tasks[name], completed=done.done, total=done.total)
                if event is not None and event.kind == "epoch":
                    updated = _update_best(best, event.data, mode)
                    if updated in tasks:
                        label = "best" if mode else "last"
                        bars.update(tasks[updated], best=f"{label} {metric} {best[updated]:.4g}")
                if job.state != state:
                    state = job.state
                    console.print(f"job {job.id} ({escape(job.name)}): {state_label(state)}")
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
    print_error(f"job {job.id} {job.state}{reason}")
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


if __name__ == "__main__":
    main()
