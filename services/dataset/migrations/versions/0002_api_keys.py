"""API keys: the table of `keys.py`.

Revision ID: 0002_api_keys
Revises: 0001_baseline
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_api_keys"
down_revision = "0001_baseline"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("pk", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("key_id", sa.String(12), nullable=False, unique=True),
        sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("app_id", sa.String(63), nullable=False, index=True),
        sa.Column("scopes", sa.String(64), nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("create_time", sa.Float, nullable=False),
        sa.Column("expire_time", sa.Float),
        sa.Column("revoke_time", sa.Float),
        sqlite_autoincrement=True,
    )


def downgrade() -> None:
    op.drop_table("api_keys")
