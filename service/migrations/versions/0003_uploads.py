"""Uploaded workload packs: the packs (stored once per content), who owns which, the pack a job runs, and which
tokens may upload code.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("koala_api_tokens") as batch:
        batch.add_column(sa.Column("allow_uploads", sa.Boolean, nullable=False, server_default=sa.false()))
    with op.batch_alter_table("koala_jobs") as batch:
        batch.add_column(sa.Column("upload", sa.String(71), nullable=True))
    op.create_index("ix_koala_jobs_upload", "koala_jobs", ["upload"])
    # A pack's bytes and what they hold, once per content whoever uploaded it.
    op.create_table(
        "koala_upload_blobs",
        sa.Column("digest", sa.String(71), primary_key=True),  # "sha256:<hex>" of `data`
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("unpacked_size", sa.BigInteger, nullable=False),
        sa.Column("files", sa.JSON, nullable=False),  # [[path, size], ...]
        sa.Column("requirements", sa.JSON, nullable=False),  # requirement lines of its requirements.txt
        sa.Column("data", sa.LargeBinary, nullable=False),  # the zip archive
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("linked_at", sa.DateTime(timezone=True), nullable=False),  # last time an owner uploaded it
    )
    # Who may use which pack: one row per (owner, pack); the owner is the token id, "" for an open server.
    op.create_table(
        "koala_uploads",
        sa.Column("owner", sa.String(32), primary_key=True),
        sa.Column("digest", sa.String(71), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=False),  # uploaded again, or named by a job
    )
    op.create_index("ix_koala_uploads_digest", "koala_uploads", ["digest"])


def downgrade() -> None:
    op.drop_table("koala_uploads")
    op.drop_table("koala_upload_blobs")
    op.drop_index("ix_koala_jobs_upload", "koala_jobs")
    with op.batch_alter_table("koala_jobs") as batch:
        batch.drop_column("upload")
    with op.batch_alter_table("koala_api_tokens") as batch:
        batch.drop_column("allow_uploads")
