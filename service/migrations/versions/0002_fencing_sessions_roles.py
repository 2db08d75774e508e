"""Driver fencing (a generation per job), token roles and revocation, dashboard sessions.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Every driver start takes the next generation; a driver's writes are conditional on it.
    with op.batch_alter_table("koala_jobs") as batch:
        batch.add_column(sa.Column("generation", sa.Integer, nullable=False, server_default="0"))
    with op.batch_alter_table("koala_api_tokens") as batch:
        batch.add_column(sa.Column("admin", sa.Boolean, nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "koala_sessions",
        sa.Column("id_hash", sa.String(64), primary_key=True),  # SHA-256 of the random session id in the cookie
        sa.Column("token_id", sa.String(32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_koala_sessions_token_id", "koala_sessions", ["token_id"])


def downgrade() -> None:
    op.drop_table("koala_sessions")
    with op.batch_alter_table("koala_api_tokens") as batch:
        batch.drop_column("revoked_at")
        batch.drop_column("admin")
    with op.batch_alter_table("koala_jobs") as batch:
        batch.drop_column("generation")
