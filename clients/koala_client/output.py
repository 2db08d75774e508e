"""What the `koala` command prints: messages and progress on stderr, tables and machine-readable output on stdout
(so `JOB=$(koala submit job.yaml)` works), the report table and its learning-curve plot."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console(stderr=True, highlight=False)


def stdout() -> Console:
    """Where tables go: the terminal's width, or 160 columns when stdout is a file or pipe (rich would use 80)."""
    out = Console()
    return out if out.is_terminal else Console(width=160)


def print_error(message: str) -> None:
    # One line, however long: the terminal wraps it, and a log or `grep` gets it whole.
    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)


def progress() -> Progress:
    return Progress(
        TextColumn("{task.description:<22}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[best]}"),
        TimeElapsedColumn(),
        console=console,
    )


STATE_STYLES = {"succeeded": "green", "failed": "red", "cancelled": "yellow", "cancelling": "yellow", "running": "cyan"}


def state_label(state: str) -> str:
    style = STATE_STYLES.get(state)
    return f"[{style}]{state}[/{style}]" if style else state


def when(moment: datetime) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M")


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
