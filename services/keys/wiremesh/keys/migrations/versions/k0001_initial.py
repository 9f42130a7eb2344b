"""Initial key registry schema: auth keys and node keys.

Revision ID: k0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "k0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "keys_auth_keys",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("prefix", sa.String(32), nullable=False, unique=True),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("user", sa.String(128), nullable=False),
        sa.Column("reusable", sa.Boolean, nullable=False),
        sa.Column("ephemeral", sa.Boolean, nullable=False),
        sa.Column("tags", sa.JSON, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=True),
        sa.Column("used_count", sa.Integer, nullable=False, server_default="0"),
        sa.Column("expired_at", sa.Float, nullable=True),
    )
    op.create_table(
        "keys_node_keys",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("node_id", sa.Integer, nullable=False, index=True),
        sa.Column("machine_key", sa.String(64), nullable=False, index=True),
        sa.Column("node_key", sa.String(64), nullable=False, unique=True),
        sa.Column("disco_key", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=True),
        sa.Column("revoked_at", sa.Float, nullable=True, index=True),
        sa.Column("reason", sa.String(32), nullable=False, server_default=""),
    )


def downgrade() -> None:
    op.drop_table("keys_node_keys")
    op.drop_table("keys_auth_keys")
