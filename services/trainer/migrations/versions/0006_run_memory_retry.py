"""Out-of-memory retries: how often a run was retried smaller, and each worker's memory.

Revision ID: 0006_run_memory_retry
Revises: 0005_evaluation_label_likelihood
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_run_memory_retry"
down_revision = "0005_evaluation_label_likelihood"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "model_versions",
        sa.Column("memory_retries", sa.Integer, nullable=False, server_default="0"),
    )
    op.add_column("workers", sa.Column("memory_bytes", sa.BigInteger, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.drop_column("memory_bytes")
    with op.batch_alter_table("model_versions") as batch:
        batch.drop_column("memory_retries")
