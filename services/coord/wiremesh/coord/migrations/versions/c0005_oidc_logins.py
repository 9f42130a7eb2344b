"""Interactive (OIDC) logins: logins waiting for their user, who is who at the identity
provider, and each user's identity-provider groups as of their last login.

Revision ID: c0005
Revises: c0004
"""

import sqlalchemy as sa
from alembic import op

revision = "c0005"
down_revision = "c0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("coord_users", sa.Column("groups", sa.JSON, nullable=False, server_default="[]"))
    op.create_table(
        "coord_oidc_identities",
        sa.Column("issuer", sa.String(255), primary_key=True),
        sa.Column("subject", sa.String(255), primary_key=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("coord_users.id"), nullable=False),
        sa.Column("email", sa.String(128), nullable=False),
        sa.Column("last_login", sa.Float, nullable=False),
    )
    op.create_table(
        "coord_pending_logins",
        sa.Column("login_id", sa.String(64), primary_key=True),
        sa.Column("state", sa.String(64), nullable=False, unique=True),
        sa.Column("machine_key", sa.String(64), nullable=False, unique=True),
        sa.Column("node_key", sa.String(64), nullable=False),
        sa.Column("nonce", sa.String(64), nullable=False),
        sa.Column("code_verifier", sa.String(128), nullable=False),
        sa.Column("force_reauth", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False, index=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("user", sa.String(128), nullable=True),
        sa.Column("error", sa.String(256), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("coord_pending_logins")
    op.drop_table("coord_oidc_identities")
    op.drop_column("coord_users", "groups")
