"""Alembic environment: the caller hands over a live connection (see control.service.run_migrations)."""

from alembic import context

config = context.config
context.configure(
    connection=config.attributes["connection"],
    version_table=config.attributes["version_table"],
    target_metadata=None,
)
with context.begin_transaction():
    context.run_migrations()
