"""Workload code a client sends with its job: the stored packs, their owners and retention, and the permission to
upload (the HTTP routes: service/api/uploads.py; the pack format: service/packs.py; the driver's side:
service/upload_runtime.py).

A pack is a zip archive of the client's workload directory, every entry under the directory's name
(`my_workload/model.py`), so a job may name `workload: my_workload.model:MyWorkload` with `upload: sha256:...`
(`koala submit job.yaml --workload-dir ./my_workload` packs, uploads and submits).

- `POST /v1/uploads` streams the pack in, refusing it (413) once it passes `max_upload_bytes`, and checks it before
  it is stored (422): a zip archive of at most `max_upload_files` entries and `max_upload_unpacked_bytes`, plain
  files and directories only (no links), every path relative and inside the pack (no absolute paths, no `..`), every
  file's bytes matching its checksum. Packs are stored in the database, content-addressed (sha256: the same bytes
  are stored once, whoever uploads them) and owned per token (another owner's digest is 404).
- Uploading code is running code on the cluster: it is allowed to tokens created with `koala token create
  --allow-uploads`, to every token with KOALA_ALLOW_UPLOADS=true, and on an open server (loopback only); otherwise
  403, saying how an operator enables it.
- Neither the API process nor the job's driver imports the uploaded code. The driver writes the pack to its scratch
  directory and hands it to Ray as the job's runtime environment (`working_dir`), so Ray ships it to whichever node
  runs a task of the job; the workload is checked there (it imports, is a Workload, its config parses, its metric
  exists) by a short Ray task before any trial is planned, and a failure fails the job with the message.
- A `requirements.txt` at the top of the pack goes to Ray's `pip` runtime environment when the operator allows
  package installs (KOALA_ALLOW_PACKAGE_INSTALLS); otherwise a job that needs it is refused.
- An upload is deleted `upload_retention_seconds` after the last job that ran it ended (or after its last use, when
  no job did), by a sweeper in the API process; its owner may delete it earlier (`koala uploads delete`).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from koala_client import models
from service.auth import Caller
from service.jobspec import JobSpec, SpecError
from service.packs import REQUIREMENTS, PackInfo, module_in, top_level
from service.problems import ProblemError
from service.settings import Settings
from service.store import JobRow, Store, jobs, metadata

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

log = logging.getLogger(__name__)

LINK_GRACE_SECONDS = 10.0  # a pack's bytes outlive its last owner by this much (an upload of them may be under way)
ACTIVE_JOB_STATES = ("queued", "running", "cancelling")


blobs = sa.Table(
    "koala_upload_blobs",
    metadata,
    sa.Column("digest", sa.String(71), primary_key=True),  # "sha256:<hex>" of `data`
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("unpacked_size", sa.BigInteger, nullable=False),
    sa.Column("files", sa.JSON, nullable=False),  # [[path, size], ...]
    sa.Column("requirements", sa.JSON, nullable=False),
    sa.Column("data", sa.LargeBinary, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("linked_at", sa.DateTime(timezone=True), nullable=False),
)

links = sa.Table(
    "koala_uploads",
    metadata,
    sa.Column("owner", sa.String(32), primary_key=True),  # the token id; "" on an open server
    sa.Column("digest", sa.String(71), primary_key=True, index=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=False),
)


def owner_key(owner: str | None) -> str:
    return owner or ""


def _aware(value: datetime) -> datetime:
    from datetime import UTC

    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


@dataclass(frozen=True)
class UploadRow:
    owner: str
    digest: str
    size: int
    unpacked_size: int
    files: list[tuple[str, int]]
    requirements: list[str]
    created_at: datetime
    last_used_at: datetime
    jobs: int = 0

    @property
    def paths(self) -> list[str]:
        return [path for path, _ in self.files]

    def file_list(self) -> list[models.UploadFile]:
        return [models.UploadFile(path=path, size=size) for path, size in self.files]

    def to_schema(self, *, with_files: bool) -> models.Upload:
        return models.Upload(
            digest=self.digest,
            size=self.size,
            unpacked_size=self.unpacked_size,
            file_count=len(self.files),
            files=self.file_list() if with_files else None,
            requirements=self.requirements,
            created_at=self.created_at,
            last_used_at=self.last_used_at,
            jobs=self.jobs,
        )


class Uploads:
    """The stored packs and who owns them, in the service's database (beside `Store`'s tables)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.engine = store.engine

    def _jobs_of(self, owner: sa.ColumnElement[str], digest: sa.ColumnElement[str]) -> sa.ColumnElement[bool]:
        return sa.and_(jobs.c.upload == digest, sa.func.coalesce(jobs.c.owner, "") == owner)

    def _query(self) -> sa.Select[Any]:
        count = sa.select(sa.func.count()).select_from(jobs).where(self._jobs_of(links.c.owner, links.c.digest))
        return sa.select(
            links.c.owner,
            links.c.digest,
            links.c.created_at,
            links.c.last_used_at,
            blobs.c.size,
            blobs.c.unpacked_size,
            blobs.c.files,
            blobs.c.requirements,
            count.scalar_subquery().label("jobs"),
        ).select_from(links.join(blobs, links.c.digest == blobs.c.digest))

    @staticmethod
    def _row(row: sa.Row[Any]) -> UploadRow:
        return UploadRow(
            owner=row.owner,
            digest=row.digest,
            size=int(row.size),
            unpacked_size=int(row.unpacked_size),
            files=[(str(path), int(size)) for path, size in row.files],
            requirements=[str(line) for line in row.requirements],
            created_at=_aware(row.created_at),
            last_used_at=_aware(row.last_used_at),
            jobs=int(row.jobs),
        )

    def add(self, owner: str, digest: str, data: bytes, info: PackInfo) -> tuple[UploadRow, bool]:
        """Store a checked pack for `owner` (its bytes once, whoever else holds them); returns (upload, whether
        `owner` did not hold it before)."""
        for attempt in range(3):
            try:
                with self.engine.begin() as db:
                    created = self._add(db, owner, digest, data, info)
                break
            except sa.exc.IntegrityError:  # a concurrent upload of the same bytes inserted first: now they exist
                if attempt == 2:
                    raise
        row = self.get(owner, digest)
        assert row is not None
        return row, created

    def _add(self, db: Connection, owner: str, digest: str, data: bytes, info: PackInfo) -> bool:
        at = self.store._db_now()
        # Updating linked_at locks the row, and keeps a sweep that runs meanwhile from deleting the bytes.
        if db.execute(blobs.update().where(blobs.c.digest == digest).values(linked_at=at)).rowcount == 0:
            db.execute(
                blobs.insert().values(
                    digest=digest,
                    size=len(data),
                    unpacked_size=info.unpacked_size,
                    files=[[path, size] for path, size in info.files],
                    requirements=list(info.requirements),
                    data=data,
                    created_at=at,
                    linked_at=at,
                )
            )
        mine = sa.and_(links.c.owner == owner, links.c.digest == digest)
        if db.execute(links.update().where(mine).values(last_used_at=at)).rowcount == 1:
            return False
        db.execute(links.insert().values(owner=owner, digest=digest, created_at=at, last_used_at=at))
        return True

    def get(self, owner: str, digest: str) -> UploadRow | None:
        query = self._query().where(links.c.owner == owner, links.c.digest == digest)
        with self.engine.connect() as db:
            row = db.execute(query).first()
        return self._row(row) if row is not None else None

    def owned_by(self, owner: str) -> list[UploadRow]:
        query = self._query().where(links.c.owner == owner).order_by(links.c.created_at.desc(), links.c.digest)
        with self.engine.connect() as db:
            return [self._row(row) for row in db.execute(query)]

    def touch(self, owner: str, digest: str) -> bool:
        """Mark the upload used now (a job names it); False when `owner` does not hold it."""
        mine = sa.and_(links.c.owner == owner, links.c.digest == digest)
        with self.engine.begin() as db:
            return bool(db.execute(links.update().where(mine).values(last_used_at=self.store._db_now())).rowcount)

    def delete(self, owner: str, digest: str) -> list[str] | None:
        """Forget `owner`'s upload: None when it holds no such upload; else the ids of its jobs that still need it
        (queued or running: then nothing is deleted), an empty list once deleted."""
        mine = sa.and_(links.c.owner == owner, links.c.digest == digest)
        with self.engine.begin() as db:
            if db.execute(sa.select(links.c.digest).where(mine)).first() is None:
                return None
            needed = sa.select(jobs.c.id).where(
                self._jobs_of(sa.literal(owner), sa.literal(digest)), jobs.c.state.in_(ACTIVE_JOB_STATES)
            )
            active = list(db.execute(needed).scalars())
            if active:
                return active
            db.execute(links.delete().where(mine))
            self._delete_orphans(db)
        return []

    def pack(self, digest: str) -> tuple[bytes, list[str]] | None:
        """The bytes of a stored pack and the requirements its check at upload found in it."""
        with self.engine.connect() as db:
            row = db.execute(sa.select(blobs.c.data, blobs.c.requirements).where(blobs.c.digest == digest)).first()
        return (bytes(row.data), list(row.requirements)) if row is not None else None

    def sweep(self, retention_seconds: float) -> int:
        """Delete the uploads whose last use and whose jobs' ends are `retention_seconds` past (none of whose jobs
        is queued or running), then the bytes no owner holds; returns how many uploads went."""
        cutoff = self.store._db_now(-retention_seconds)
        kept = (
            sa.select(jobs.c.id)
            .where(
                self._jobs_of(links.c.owner, links.c.digest),
                sa.or_(
                    jobs.c.state.in_(ACTIVE_JOB_STATES),
                    jobs.c.finished_at.is_(None),
                    jobs.c.finished_at > cutoff,
                ),
            )
            .exists()
        )
        with self.engine.begin() as db:
            removed = db.execute(links.delete().where(links.c.last_used_at < cutoff, ~kept)).rowcount
            self._delete_orphans(db)
        return int(removed or 0)

    def _delete_orphans(self, db: Connection) -> None:
        held = sa.select(links.c.digest).where(links.c.digest == blobs.c.digest).exists()
        settled = blobs.c.linked_at < self.store._db_now(-LINK_GRACE_SECONDS)
        db.execute(blobs.delete().where(settled, ~held))

    def stored_digests(self) -> list[str]:
        """Every pack whose bytes are stored (for tests and operators)."""
        with self.engine.connect() as db:
            return list(db.execute(sa.select(blobs.c.digest).order_by(blobs.c.digest)).scalars())


class Sweeper:
    """Runs `Uploads.sweep` in a thread of the API process, every half retention period (1 s to 60 s)."""

    def __init__(self, uploads: Uploads, settings: Settings) -> None:
        self.uploads = uploads
        self.retention = settings.upload_retention_seconds
        self.period = max(1.0, min(60.0, self.retention / 2))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="koala-upload-sweeper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            try:
                removed = self.uploads.sweep(self.retention)
                if removed:
                    log.info("%d upload(s) past their retention period deleted", removed)
            except Exception:  # the database may be briefly unavailable; try again next period
                log.exception("upload sweep failed")


# ---- permission and a job's upload ---------------------------------------------------------------------------------

FORBIDDEN = (
    "uploading workload code runs it on this server's Ray cluster, so it is allowed only to tokens an operator chose: "
    "`koala token create --allow-uploads` (run where the server runs), or KOALA_ALLOW_UPLOADS=true for every token"
)


def may_upload(who: Caller, settings: Settings) -> bool:
    return who.allow_uploads or settings.allow_uploads


def forbidden() -> ProblemError:
    return ProblemError(403, "Uploads not allowed", FORBIDDEN, type="https://koala.dev/problems/uploads-not-allowed")


def upload_not_found(digest: str, field: str | None = None) -> ProblemError:
    detail = f"no upload {digest} (another token's uploads are not visible; upload the workload first)"
    return ProblemError(404, "Not Found", detail, field=field, type="https://koala.dev/problems/not-found")


def check_submission(uploads: Uploads, settings: Settings, who: Caller, spec: JobSpec) -> None:
    """The checks of a submitted job's upload that need the database: the caller may upload, holds it (404), the
    workload's module is in it, and its requirements can be installed here. Marks it used."""
    if spec.upload is None:
        return
    if not may_upload(who, settings):
        raise forbidden()
    row = uploads.get(owner_key(who.owner), spec.upload)
    if row is None:
        raise upload_not_found(spec.upload, field="upload")
    problems = []
    if spec.uploaded_workload:
        module = spec.workload.partition(":")[0]
        if not module_in(module, row.paths):
            holds = ", ".join(sorted(top_level(row.paths))) or "nothing importable"
            problems.append(("workload", f"module {module!r} is not in the upload (its top level holds: {holds})"))
    if row.requirements and not settings.allow_package_installs:
        problems.append(
            (
                "upload",
                f"the upload has a {REQUIREMENTS} ({len(row.requirements)} requirement(s)), and this server does not "
                "install packages (an operator allows it with KOALA_ALLOW_PACKAGE_INSTALLS=true); install them on the "
                f"Ray nodes instead and leave {REQUIREMENTS} out of the pack (.koalaignore)",
            )
        )
    if problems:
        raise SpecError([{"field": field, "message": message} for field, message in problems])
    uploads.touch(owner_key(who.owner), spec.upload)


def job_upload(uploads: Uploads, job: JobRow) -> models.JobUpload | None:
    """The upload a job runs, with its file list while it is stored."""
    if job.upload is None:
        return None
    row = uploads.get(owner_key(job.owner), job.upload)
    if row is None:
        return models.JobUpload(digest=job.upload)
    return models.JobUpload(digest=job.upload, size=row.size, files=row.file_list())
