"""The driver's side of an uploaded workload: the job's pack handed to Ray as the runtime environment of every worker
of the job (so Ray ships it to whichever node runs a trial), and the workload checked there by a short Ray task
(service/workload_check.py) before any trial is planned. Neither the driver nor the API imports the uploaded code."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.jobspec import JobSpec
from service.packs import REQUIREMENTS, PackError, inspect_pack
from service.settings import Settings
from service.store import Store
from service.uploads import Uploads

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


class WorkloadCheckError(Exception):
    """The job's uploaded workload cannot run: the message is the job's error."""


def runtime_environment(store: Store, settings: Settings, spec: JobSpec, into: Path) -> dict[str, Any]:
    """Ray's runtime environment for the job's workers: the job's pack, written to `into`, as their working
    directory (and its requirements for pip, where the operator allows installs). The pack is read, never
    unpacked or imported here."""
    digest = spec.upload
    if digest is None:
        return {}
    data = Uploads(store).data(digest)
    if data is None:
        raise WorkloadCheckError(
            f"upload {digest} is no longer stored (deleted by its owner, or past its retention period); "
            "submit the job again with the workload directory"
        )
    if f"sha256:{hashlib.sha256(data).hexdigest()}" != digest:
        raise WorkloadCheckError(f"the stored bytes of upload {digest} do not match its digest")
    try:
        info = inspect_pack(
            io.BytesIO(data),
            max_files=settings.max_upload_files,
            max_unpacked_bytes=settings.max_upload_unpacked_bytes,
        )
    except PackError as error:
        raise WorkloadCheckError(f"upload {digest} is not a pack this server accepts: {error}") from None
    if info.requirements and not settings.allow_package_installs:
        raise WorkloadCheckError(
            f"upload {digest} has a {REQUIREMENTS}, and this server does not install packages "
            "(KOALA_ALLOW_PACKAGE_INSTALLS)"
        )
    into.mkdir(parents=True, exist_ok=True)
    pack = into / f"workload-{digest.removeprefix('sha256:')[:16]}.zip"
    pack.write_bytes(data)
    # A local zip archive: Ray uploads it to the cluster as it is and unpacks it, top directory kept, on each node.
    environment: dict[str, Any] = {"working_dir": str(pack)}
    if info.requirements:
        environment["pip"] = {"packages": info.requirements, "pip_check": False}
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


def check_workload(spec: JobSpec, timeout: float) -> JobSpec:
    """Check the job's uploaded workload in a short Ray task under the job's runtime environment (so on whichever
    node runs it, from the pack Ray shipped there); returns the spec knowing the workload's metrics. Raises
    WorkloadCheckError with the reason (import error, not a Workload, bad config, unknown metric)."""
    import ray
    from ray.exceptions import GetTimeoutError, RayError, RuntimeEnvSetupError

    from service.workload_check import inspect_workload

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
        raise WorkloadCheckError(f"checking the uploaded workload failed: {_tail(error)}") from None
    result = _parse_answer(answer)
    if "error" in result:
        raise WorkloadCheckError(f"the uploaded workload {spec.workload} cannot run: {result['error']}")
    return spec.with_checked_workload(result["metric"], result["modes"])


def _parse_answer(answer: object) -> dict[str, Any]:
    try:
        result = json.loads(answer) if isinstance(answer, str) else None
    except ValueError:
        result = None
    if isinstance(result, dict) and isinstance(result.get("error"), str):
        return {"error": result["error"][:2000]}
    if isinstance(result, dict) and isinstance(result.get("metric"), str) and isinstance(result.get("modes"), dict):
        modes = result["modes"]
        if result["metric"] in modes and all(isinstance(k, str) and v in ("max", "min") for k, v in modes.items()):
            return result
    raise WorkloadCheckError("the check of the uploaded workload gave an answer this driver does not understand")


def _tail(error: BaseException, limit: int = 2000) -> str:
    text = f"{type(error).__name__}: {error}".strip()
    return text if len(text) <= limit else f"...{text[-limit:]}"


def prepare_job(store: Store, settings: Settings, spec: JobSpec, into: Path) -> JobSpec:
    """For a job with an upload: connect this driver to Ray with the pack as the job's runtime environment, and
    check an uploaded workload on the cluster. Returns the spec to run (knowing the workload's metrics); raises
    WorkloadCheckError. Ray stays connected for the run (the caller shuts it down)."""
    started = time.monotonic()
    connect_with(runtime_environment(store, settings, spec, into))
    shipped = time.monotonic()
    log.info("upload %s handed to Ray in %.2f s", spec.upload, shipped - started)
    if not spec.uploaded_workload:
        return spec
    checked = check_workload(spec, settings.upload_check_seconds)
    log.info("workload %s checked on the cluster in %.2f s", spec.workload, time.monotonic() - shipped)
    return checked
