"""The `koala` command line.

`koala run job.yaml` executes a JobSpec in this process (no server) through the engine the service uses, with live
progress, then prints the report and writes it as JSON plus a PNG of the learning curves.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import uuid
from pathlib import Path
from types import FrameType
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console(stderr=True)


def default_data_dir() -> Path:
    """Where jobs keep their database and outputs: $KOALA_DATA_DIR, else ~/.koala."""
    return Path(os.environ.get("KOALA_DATA_DIR") or Path.home() / ".koala").expanduser()


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
    from service.engine import Event, run_job
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
            entry.name: progress.add_task(entry.name, total=(entry.trials or 0) + len(spec.seed_list), best="")
            for entry in spec.optimizers
        }

        def on_event(event: Event) -> None:
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
    Console().print(table)
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
        Console().print(text)


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
