"""A job's drivers on this host: their directories on disk, the PYTHONPATH they start with, and telling a driver's
process from another that reuses its pid."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from service.settings import Settings

STANDBY_FLAG = "--standby"  # `python -P -m service.worker --standby`: a driver waiting for a job (see worker.py)
STANDBY_READY = "ready"  # the file a standby writes into its directory once it is warm


def scratch_dir(settings: Settings, job_id: str) -> Path:
    """Tune's directory of a job (its drivers' experiments, with the trials' checkpoints)."""
    return settings.data_dir / "tune" / job_id


def driver_dir(settings: Settings, job_id: str) -> Path:
    """Where the working directories of a job's drivers are (one per start)."""
    return settings.data_dir / "drivers" / job_id


def standby_dir(settings: Settings) -> Path:
    """Where this process's standby drivers wait (one directory each, removed by the standby when it leaves)."""
    return settings.data_dir / "standby" / str(os.getpid())


def remove_scratch(settings: Settings, job_id: str) -> None:
    """Delete what an ended job kept on disk while it ran; its report needs none of it (it is in the studies)."""
    for path in (scratch_dir(settings, job_id), driver_dir(settings, job_id)):
        shutil.rmtree(path, ignore_errors=True)


def driver_pythonpath(inherited: str | None) -> str:
    """PYTHONPATH for a driver: the inherited entries made absolute (the driver runs in another directory), and the
    directory this code is imported from when only the server's working directory provided it (a source checkout
    run in place; an installed package is found without it)."""
    entries = [os.path.abspath(entry) for entry in (inherited or "").split(os.pathsep) if entry]
    root = os.path.realpath(Path(__file__).resolve().parent.parent)
    cwd = os.path.realpath(os.getcwd())
    found = {os.path.realpath(p) for p in [*sys.path, *entries] if p} - {cwd}
    if root not in found:
        entries.insert(0, root)
    return os.pathsep.join(entries)


def remove_stale_standby_dirs(base: Path) -> None:
    """Remove the standby directories of API processes that are gone (a standby removes its own when it leaves,
    unless it was killed)."""
    if not base.is_dir():
        return
    for path in base.iterdir():
        if path.name.isdigit() and not process_exists(int(path.name)):
            shutil.rmtree(path, ignore_errors=True)


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_driver(pid: int, job_id: str) -> bool:
    """Whether process `pid` on this host is the driver of `job_id` (a reused pid is not): a driver started for it,
    or a standby driver that took it (in the job's working directory, or on its way there)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (macOS): fall back to "a process with that pid exists"
        return process_exists(pid)
    if b"service.worker" not in cmdline:
        return False
    if job_id.encode() in cmdline:
        return True
    if STANDBY_FLAG.encode() not in cmdline:
        return False
    try:
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return True  # it exists, and is a standby: the one recorded for this job
    return job_id in cwd.parts or "standby" in cwd.parts
