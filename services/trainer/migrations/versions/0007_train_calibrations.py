"""Training throughput measured by workers at their start, for estimates before any run.

Revision ID: 0007_train_calibrations
Revises: 0006_run_memory_retry
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_train_calibrations"
down_revision = "0006_run_memory_retry"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "train_calibrations",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("signature", sa.String(64), nullable=False, index=True),
        sa.Column("base_model", sa.Text, nullable=False),
        sa.Column("worker_kind", sa.String(10), nullable=False),
        sa.Column("worker_id", sa.String(200), nullable=False),
        sa.Column("machine", sa.Text, nullable=False),
        sa.Column("threads", sa.Integer, nullable=False),
        sa.Column("batch_size", sa.Integer, nullable=False),
        sa.Column("points", sa.JSON, nullable=False),
        sa.Column("load_seconds", sa.Float, nullable=False),
        sa.Column("measured_at", sa.Float, nullable=False, index=True),
        sa.Column("cpu_share", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("train_calibrations")
