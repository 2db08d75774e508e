"""Workload packs a client sends with its job (docs/architecture.md "Security"): upload, list, show and delete
them, and ask whether this caller may upload. Their storage, retention and the permission are in service/uploads.py;
the request's size limit is enforced as the body streams in."""

from __future__ import annotations

import hashlib
import tempfile
from typing import Annotated, Any

from fastapi import APIRouter, Request, Response
from fastapi import Path as PathParam
from starlette.concurrency import run_in_threadpool

from koala_client import models
from service.api.deps import Auth, SettingsDep, UploadsDep
from service.jobspec import UPLOAD_DIGEST
from service.packs import PackError, inspect_pack, mib
from service.problems import ProblemError
from service.uploads import FORBIDDEN, forbidden, may_upload, owner_key, upload_not_found

SPOOL_BYTES = 1 << 20  # an upload is held in memory up to this, then in a temporary file

router = APIRouter(tags=["uploads"])
Digest = Annotated[str, PathParam(pattern=UPLOAD_DIGEST, description="`sha256:` and the hex digest of the pack")]
PACK_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "The workload pack: a zip archive of the workload directory, its entries under the directory's "
        "name (what `koala submit --workload-dir` sends)",
        # Any content type is accepted (`koala` sends application/zip); the schema says octet-stream, which every
        # OpenAPI tool can send.
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


@router.post(
    "/v1/uploads",
    status_code=201,
    response_model=models.Upload,
    openapi_extra=PACK_BODY,
    responses={
        200: {"model": models.Upload, "description": "This token had uploaded the same bytes before"},
        403: {"model": models.Problem, "description": "This token may not upload code"},
        413: {"model": models.Problem, "description": "The pack is larger than the server accepts"},
    },
)
async def create_upload(
    request: Request, response: Response, who: Auth, settings: SettingsDep, uploads: UploadsDep
) -> models.Upload:
    """Store a workload pack (a zip archive, the request body) for the caller; returns its digest, which a JobSpec
    names as `upload`. Checked before it is stored: size, entries, paths (relative, inside the pack), plain files."""
    if not may_upload(who, settings):
        raise forbidden()
    limit = settings.max_upload_bytes
    hasher = hashlib.sha256()
    size = 0
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as spool:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                detail = f"the pack is larger than this server accepts ({mib(limit)})"
                raise ProblemError(413, "Upload too large", detail)
            hasher.update(chunk)
            spool.write(chunk)
        if size == 0:
            raise ProblemError(422, "Empty upload", "send the workload pack (a zip archive) as the body", field="body")
        spool.seek(0)
        try:
            info = await run_in_threadpool(
                inspect_pack,
                spool,
                max_files=settings.max_upload_files,
                max_unpacked_bytes=settings.max_upload_unpacked_bytes,
            )
        except PackError as error:
            raise ProblemError(422, "Invalid workload pack", str(error), field="body") from None
        spool.seek(0)
        data = spool.read()
    digest = f"sha256:{hasher.hexdigest()}"
    row, created = await run_in_threadpool(uploads.add, owner_key(who.owner), digest, data, info)
    response.status_code = 201 if created else 200
    return row.to_schema(with_files=True)


@router.get("/v1/uploads", response_model=list[models.Upload])
def list_uploads(who: Auth, uploads: UploadsDep) -> list[models.Upload]:
    """The caller's uploads, newest first (without their file lists)."""
    return [row.to_schema(with_files=False) for row in uploads.owned_by(owner_key(who.owner))]


@router.get("/v1/uploads/limits", response_model=models.UploadLimits)
def upload_limits(who: Auth, settings: SettingsDep) -> models.UploadLimits:
    """Whether the caller may upload code, and the limits a pack must keep to."""
    allowed = may_upload(who, settings)
    return models.UploadLimits(
        allowed=allowed,
        detail=None if allowed else FORBIDDEN,
        max_bytes=settings.max_upload_bytes,
        max_files=settings.max_upload_files,
        max_unpacked_bytes=settings.max_upload_unpacked_bytes,
        package_installs=settings.allow_package_installs,
    )


@router.get("/v1/uploads/{digest}", response_model=models.Upload, responses={404: {"model": models.Problem}})
def get_upload(digest: Digest, who: Auth, uploads: UploadsDep) -> models.Upload:
    """One of the caller's uploads, with its file list."""
    row = uploads.get(owner_key(who.owner), digest)
    if row is None:
        raise upload_not_found(digest)
    return row.to_schema(with_files=True)


@router.delete(
    "/v1/uploads/{digest}",
    status_code=204,
    responses={404: {"model": models.Problem}, 409: {"model": models.Problem, "description": "A job needs it"}},
)
def delete_upload(digest: Digest, who: Auth, uploads: UploadsDep) -> Response:
    """Delete one of the caller's uploads, unless a queued or running job of the caller needs it."""
    needed = uploads.delete(owner_key(who.owner), digest)
    if needed is None:
        raise upload_not_found(digest)
    if needed:
        raise ProblemError(409, "Upload in use", f"job(s) {', '.join(needed)} still need upload {digest}")
    return Response(status_code=204)
