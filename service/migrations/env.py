"""Alembic environment for our tables. Run through `Store.migrate()`, which passes the connection in.

Our version table is `koala_schema_version`; Optuna's `alembic_version` is never read or written here.
"""

from alembic import context

from service.store.tables import VERSION_TABLE, metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, version_table=VERSION_TABLE)
with context.begin_transaction():
    context.run_migrations()
