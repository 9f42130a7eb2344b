"""Accepted agent handshakes (their ephemeral keys): the replay guard shared by all replicas.

Revision ID: c0002
Revises: c0001
"""

import sqlalchemy as sa
from alembic import op

revision = "c0002"
down_revision = "c0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "coord_handshakes",
        sa.Column("ephemeral", sa.LargeBinary(32), primary_key=True),
        sa.Column("expires_at", sa.Float, nullable=False),
    )
    op.create_index("ix_coord_handshakes_expires_at", "coord_handshakes", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_coord_handshakes_expires_at", "coord_handshakes")
    op.drop_table("coord_handshakes")
