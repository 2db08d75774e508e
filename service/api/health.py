"""Probes: liveness (`/healthz`) and readiness (`/readyz`), both answered without a token."""

from __future__ import annotations

import os
import socket

from fastapi import APIRouter, Request

from koala_client import models
from service.api.deps import SettingsDep, StoreDep
from service.auth import identify
from service.problems import ProblemError
from service.ray_head import head_directory, read_state
from service.settings import Settings

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"model": models.Problem}})
def readyz(request: Request, settings: SettingsDep, store: StoreDep) -> dict[str, str]:
    """Readiness: the database answers, and the Ray cluster in RAY_ADDRESS (if any) accepts connections. The
    details (what failed, the Ray address) are shown only to a caller with a token (or on an open server)."""
    try:
        identify(store, request.headers, request.cookies)
        detailed = True
    except ProblemError:
        detailed = False
    problem = None
    try:
        store.ping()
        ray = _ray_status(settings)
        if ray.startswith("unreachable"):
            problem = f"Ray cluster {ray}"
    except Exception as error:
        problem = f"database unavailable: {type(error).__name__}"
    if problem is not None:
        raise ProblemError(503, "Not ready", problem if detailed else "not ready")
    return {"status": "ready", "database": "ok", "ray": ray} if detailed else {"status": "ready"}


def _ray_status(settings: Settings) -> str:
    address = os.environ.get("RAY_ADDRESS")
    if not address and not settings.ray_head:
        return "local (a Ray instance is started per job)"
    if not address:
        head = read_state(head_directory(settings.data_dir))
        if head is not None and head.process_alive():
            return f"local head at {head.address} (the service's, shared by every job)"
        return "local head not running (the scheduler starts it; jobs wait until it runs)"
    if address == "auto":
        return "auto"
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host or address, int(port or 6379)), timeout=2):
            return f"reachable at {address}"
    except (OSError, ValueError) as error:
        return f"unreachable at {address}: {error}"
