"""The HTTP API's routes (docs/architecture.md "HTTP API"), one `APIRouter` per concern; `service.app.create_app`
builds the application state they read (service/api/deps.py) and includes `router`.

- jobs.py: submit, list, get and cancel jobs; their trials, results and event stream
- catalogue.py: the workloads and optimizers a JobSpec may name
- health.py: liveness and readiness probes
- uploads.py: workload packs sent with a job (their storage and permission: service/uploads.py)
"""

from __future__ import annotations

from fastapi import APIRouter

from service.api.catalogue import router as catalogue_router
from service.api.health import router as health_router
from service.api.jobs import router as jobs_router
from service.api.uploads import router as uploads_router

__all__ = ["router"]

router = APIRouter()
# In the order of the OpenAPI document's paths.
router.include_router(jobs_router)
router.include_router(catalogue_router)
router.include_router(health_router)
router.include_router(uploads_router)
