"""The driver's side of an uploaded workload: the job's pack handed to Ray as the runtime environment of every worker
of the job (so Ray ships it to whichever node runs a trial), and the workload checked there by a short Ray task
(service/workload_check.py) before any trial is planned. Neither the driver nor the API imports the uploaded code."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from service.jobspec import JobSpec
from service.packs import REQUIREMENTS
from service.settings import Settings
from service.store import Store
from service.uploads import Uploads

log = logging.getLogger(__name__)

CHECKS_DIR = "upload-checks"  # under the data directory: the passed checks, one file each (see prepare_job)


class WorkloadCheckError(Exception):
    """The job's uploaded workload cannot run: the message is the job's error."""


def runtime_environment(store: Store, settings: Settings, spec: JobSpec, into: Path) -> dict[str, Any]:
    """Ray's runtime environment for the job's workers: the job's pack, written to `into`, as their working
    directory (and its requirements for pip, where the operator allows installs). The pack is read, never
    unpacked or imported here: its bytes must match its digest, so they are the bytes checked when it was uploaded."""
    digest = spec.upload
    if digest is None:
        return {}
    stored = Uploads(store).pack(digest)
    if stored is None:
        raise WorkloadCheckError(
            f"upload {digest} is no longer stored (deleted by its owner, or past its retention period); "
            "submit the job again with the workload directory"
        )
    data, requirements = stored
    if f"sha256:{hashlib.sha256(data).hexdigest()}" != digest:
        raise WorkloadCheckError(f"the stored bytes of upload {digest} do not match its digest")
    if requirements and not settings.allow_package_installs:
        raise WorkloadCheckError(
            f"upload {digest} has a {REQUIREMENTS}, and this server does not install packages "
            "(KOALA_ALLOW_PACKAGE_INSTALLS)"
        )
    into.mkdir(parents=True, exist_ok=True)
    pack = into / f"workload-{digest.removeprefix('sha256:')[:16]}.zip"
    pack.write_bytes(data)
    # A local zip archive: Ray uploads it to the cluster as it is and unpacks it, top directory kept, on each node.
    environment: dict[str, Any] = {"working_dir": str(pack)}
    if requirements:
        environment["pip"] = {"packages": requirements, "pip_check": False}
    return environment


def connect_with(environment: Mapping[str, Any]) -> None:
    """Connect this driver to Ray (the cluster in RAY_ADDRESS, else a local Ray started for the job) with
    `environment` as the runtime environment of every worker of the job."""
    import ray

    if ray.is_initialized():
        raise WorkloadCheckError("this driver was connected to Ray before the job's workload could be shipped with it")
    address = os.environ.get("RAY_ADDRESS")
    try:
        # "local": never attach to a cluster some earlier `ray start` left recorded on this machine.
        ray.init(
            address=address or "local",
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.ERROR,
            runtime_env=dict(environment),
        )
    except Exception as error:
        raise WorkloadCheckError(f"cannot ship the uploaded workload to Ray: {type(error).__name__}: {error}") from None


def check_workload(
    spec: JobSpec, timeout: float, pack: bytes | None = None, limits: tuple[int, int] | None = None
) -> tuple[str, dict[str, str]]:
    """Check the job's uploaded workload on the cluster; returns the workload's default metric and the direction of
    each of its metrics. Raises WorkloadCheckError with the reason (import error, not a Workload, bad config, unknown
    metric).

    Given the `pack` (and the `limits` it was accepted within: most files, most unpacked bytes) and where the cluster
    has a warm checker (service/workload_checker.py), the check runs there, in a child forked with torch loaded;
    otherwise in a short Ray task under the job's runtime environment (so on whichever node runs it, from the pack Ray
    shipped there)."""
    import ray
    from ray.exceptions import GetTimeoutError, RayError, RuntimeEnvSetupError

    from service import workload_checker
    from service.workload_check import inspect_workload

    checker = workload_checker.find() if pack is not None and limits is not None else None
    submitted = time.time()
    if checker is not None:
        config = dict(spec.workload_config)
        ref = checker.check.remote(pack, spec.workload, config, spec.metric, timeout, limits)
    else:
        task = ray.remote(num_cpus=0, max_retries=0)(inspect_workload)
        ref = task.remote(spec.workload, dict(spec.workload_config), spec.metric)
    try:
        answer = ray.get(ref, timeout=timeout)
    except GetTimeoutError:
        ray.cancel(ref, force=True)
        raise WorkloadCheckError(
            f"checking the uploaded workload on the cluster took more than {timeout:g} s (KOALA_UPLOAD_CHECK_SECONDS)"
        ) from None
    except RuntimeEnvSetupError as error:
        raise WorkloadCheckError(f"the Ray nodes could not set up the uploaded workload: {_tail(error)}") from None
    except RayError as error:
        if checker is not None:  # the checker itself failed (its node went away, say): check the plain way
            log.warning("the workload checker failed (%s); checking in a Ray task", _tail(error, 300))
            return check_workload(spec, timeout)
        raise WorkloadCheckError(f"checking the uploaded workload failed: {_tail(error)}") from None
    result = _parse_answer(answer)
    _log_timing(spec.workload, submitted, time.time(), result.get("timing"), "warm checker" if checker else "task")
    if "error" in result:
        raise WorkloadCheckError(f"the uploaded workload {spec.workload} cannot run: {result['error']}")
    return result["metric"], result["modes"]


def _parse_answer(answer: object) -> dict[str, Any]:
    try:
        result = json.loads(answer) if isinstance(answer, str) else None
    except ValueError:
        result = None
    if not isinstance(result, dict):
        raise WorkloadCheckError("the check of the uploaded workload gave an answer this driver does not understand")
    timing = result.get("timing")
    times = (
        {str(k): float(v) for k, v in timing.items() if isinstance(v, (int, float))} if isinstance(timing, dict) else {}
    )
    if isinstance(result.get("error"), str):
        return {"error": result["error"][:2000], "timing": times}
    if isinstance(result.get("metric"), str) and isinstance(result.get("modes"), dict):
        modes = result["modes"]
        if result["metric"] in modes and all(isinstance(k, str) and v in ("max", "min") for k, v in modes.items()):
            return {"metric": result["metric"], "modes": modes, "timing": times}
    raise WorkloadCheckError("the check of the uploaded workload gave an answer this driver does not understand")


def _log_timing(
    workload: str, submitted: float, answered: float, timing: Mapping[str, float] | None, where: str
) -> None:
    """Where the check's seconds went, from the task's own clock readings (Unix times; on another node its clock)."""
    timing = timing or {}
    steps = [
        ("worker spawned", submitted, timing.get("process")),
        ("worker started", timing.get("process"), timing.get("start")),
        ("koala imported", timing.get("start"), timing.get("koala")),
        ("workload imported", timing.get("koala"), timing.get("imported")),
        ("answered", timing.get("imported"), answered),
    ]
    shown = ", ".join(f"{what} +{end - begin:.2f} s" for what, begin, end in steps if begin and end)
    log.info("check of %s (%s): %s", workload, where, shown or "no timing")


def _tail(error: BaseException, limit: int = 2000) -> str:
    text = f"{type(error).__name__}: {error}".strip()
    return text if len(text) <= limit else f"...{text[-limit:]}"


def check_key(spec: JobSpec) -> str:
    """What a passed check of the job's uploaded workload depends on: the pack (by its digest), the workload's name,
    its config and metric, and the versions of the code that loads it (the library, torch, Ray)."""
    body = {
        "upload": spec.upload,
        "workload": spec.workload,
        "workload_config": dict(spec.workload_config),
        "metric": spec.metric,
        "versions": {name: _version(name) for name in ("koala-optim", "torch", "ray")},
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def passed_before(directory: Path, key: str, max_age: float) -> tuple[str, dict[str, str]] | None:
    """The metric and modes a check with `key` answered when it passed, if it did within `max_age` seconds (an entry
    read is kept for another `max_age`; an older one is removed)."""
    path = directory / f"{key}.json"
    try:
        if time.time() - path.stat().st_mtime > max_age:
            path.unlink(missing_ok=True)
            return None
        stored = json.loads(path.read_text())
        os.utime(path)
    except (OSError, ValueError):
        return None
    metric, modes = stored.get("metric"), stored.get("modes")
    if isinstance(metric, str) and isinstance(modes, dict) and metric in modes:
        return metric, {str(k): str(v) for k, v in modes.items()}
    return None


def remember_pass(directory: Path, key: str, metric: str, modes: Mapping[str, str]) -> None:
    """Record a passed check (written whole, so a concurrent reader sees all of it or nothing)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        partial = directory / f"{key}.{os.getpid()}.tmp"
        partial.write_text(json.dumps({"metric": metric, "modes": dict(modes)}))
        os.replace(partial, directory / f"{key}.json")
    except OSError as error:  # the next job with this pack is checked again; nothing else depends on it
        log.warning("could not record the passed check of %s: %s", key, error)


def prepare_job(store: Store, settings: Settings, spec: JobSpec, into: Path) -> JobSpec:
    """For a job with an upload: connect this driver to Ray with the pack as the job's runtime environment, and
    check an uploaded workload on the cluster. Returns the spec to run (knowing the workload's metrics); raises
    WorkloadCheckError. Ray stays connected for the run (the caller shuts it down).

    A pack, workload and config whose check passed before (the same bytes, so the same code; within the upload
    retention period) are not checked again: a resubmitted job starts its trials without that Ray task. Packs with
    requirements are always checked, since their pip environment is built on each node and can fail there."""
    started = time.monotonic()
    environment = runtime_environment(store, settings, spec, into)
    connect_with(environment)
    shipped = time.monotonic()
    log.info("upload %s handed to Ray in %.2f s", spec.upload, shipped - started)
    if not spec.uploaded_workload:
        return spec
    passes = settings.data_dir / CHECKS_DIR
    key = check_key(spec) if "pip" not in environment else None
    known = passed_before(passes, key, settings.upload_retention_seconds) if key else None
    if known is not None:
        log.info(
            "workload %s passed its check before (same pack, config and versions): not checked again", spec.workload
        )
        return spec.with_checked_workload(*known)
    pack = Path(environment["working_dir"]).read_bytes() if "pip" not in environment else None
    limits = (settings.max_upload_files, settings.max_upload_unpacked_bytes)
    metric, modes = check_workload(spec, settings.upload_check_seconds, pack, limits)
    log.info("workload %s checked on the cluster in %.2f s", spec.workload, time.monotonic() - shipped)
    if key:
        remember_pass(passes, key, metric, modes)
    return spec.with_checked_workload(metric, modes)
