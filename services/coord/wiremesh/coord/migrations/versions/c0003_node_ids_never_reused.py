"""Node ids are never handed out twice, on SQLite too.

Without AUTOINCREMENT SQLite gives a new row max(id) + 1, so deleting the newest node let the
next registration take its id; anything that remembered that id (the operator's MeshNode
status, an admin script) would then point at another device. PostgreSQL sequences never go
back, so only SQLite's table is rebuilt (same columns, indexes and rows).

Revision ID: c0003
Revises: c0002
"""

from alembic import op

revision = "c0003"
down_revision = "c0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    with op.batch_alter_table("coord_nodes", recreate="always", table_kwargs={"sqlite_autoincrement": True}):
        pass


def downgrade() -> None:
    pass
