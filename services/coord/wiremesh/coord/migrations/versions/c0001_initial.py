"""Initial coordination schema: users, nodes, coord's own settings (its control key).

Revision ID: c0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "c0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "coord_settings",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )
    op.create_table(
        "coord_users",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(128), nullable=False, unique=True),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "coord_nodes",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("machine_key", sa.String(64), nullable=False, unique=True),
        sa.Column("node_key", sa.String(64), nullable=False, index=True),
        sa.Column("disco_key", sa.String(64), nullable=False),
        sa.Column("hostname", sa.String(64), nullable=False),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("coord_users.id"), nullable=False),
        sa.Column("tags", sa.JSON, nullable=False),
        sa.Column("addr_index", sa.Integer, nullable=False, unique=True),
        sa.Column("ipv4", sa.String(64), nullable=False, unique=True),
        sa.Column("ipv6", sa.String(64), nullable=False, unique=True),
        sa.Column("ephemeral", sa.Boolean, nullable=False),
        sa.Column("auth_key_id", sa.Integer, nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("last_seen", sa.Float, nullable=True),
        sa.Column("online", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("key_expiry", sa.Float, nullable=True),
        sa.Column("expired", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("endpoints", sa.JSON, nullable=False),
        sa.Column("advertised_routes", sa.JSON, nullable=False),
        sa.Column("approved_routes", sa.JSON, nullable=False),
        sa.Column("home_relay", sa.Integer, nullable=True),
    )


def downgrade() -> None:
    op.drop_table("coord_nodes")
    op.drop_table("coord_users")
    op.drop_table("coord_settings")
