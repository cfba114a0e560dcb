"""Baseline: the trainer's tables when migrations began, workers and run requirements included.

Revision ID: 0001_baseline
Revises:
Create Date: 2026-12-01

A database made before migrations (by `create_all`) is completed rather than
created: see `common.migrations.create_or_complete`. The tables are written out
here as they were at this revision, so later changes to the models do not
change what this revision does.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from loraforge.services.common.migrations import create_or_complete

revision = "0001_baseline"
down_revision = None
branch_labels = None
depends_on = None


def baseline() -> sa.MetaData:
    metadata = sa.MetaData()
    sa.Table(
        "models",
        metadata,
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(300), nullable=False, unique=True),
        sa.Column("app", sa.String(80), nullable=False, index=True),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("model_type", sa.String(100), nullable=False),
        sa.Column("latest_trained_version", sa.String(300), nullable=False),
        sa.Column("create_time", sa.Float, nullable=False),
        sa.Column("notes", sa.Text, nullable=True),
        sa.Column("default_inference_params", sa.Text, nullable=True),
    )
    sa.Table(
        "model_versions",
        metadata,
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(400), nullable=False, unique=True),
        sa.Column("model", sa.String(300), nullable=False, index=True),
        sa.Column("template", sa.String(200), nullable=False),
        sa.Column("dataset_version", sa.String(400), nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("param_overrides", sa.JSON, nullable=False),
        sa.Column("params", sa.JSON, nullable=False),
        sa.Column("state", sa.String(20), nullable=False, index=True),
        sa.Column("status_code", sa.Integer, nullable=False),
        sa.Column("failure_reason", sa.Text, nullable=False),
        sa.Column("progress", sa.JSON, nullable=False),
        sa.Column("metrics", sa.JSON, nullable=False),
        sa.Column("base_model", sa.Text, nullable=False),
        sa.Column("adapter_prefix", sa.Text, nullable=False),
        sa.Column("checkpoint_prefix", sa.Text, nullable=False),
        sa.Column("adapter_bytes", sa.Integer, nullable=False),
        sa.Column("create_time", sa.Float, nullable=False),
        sa.Column("start_time", sa.Float, nullable=True),
        sa.Column("end_time", sa.Float, nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("request_id", sa.String(200), nullable=True),
        sa.Column("worker_id", sa.String(200), nullable=False),
        sa.Column("lease_expires", sa.Float, nullable=True),
        sa.Column("checkpoint_step", sa.Integer, nullable=False),
        sa.Column("checkpoint_key", sa.Text, nullable=False),
        sa.Column("last_sequence", sa.Integer, nullable=False),
        sa.Column("references_dataset", sa.Boolean, nullable=False),
        sa.Column("needs_cuda", sa.Boolean, nullable=True),
        sa.Column("needs_gptq", sa.Boolean, nullable=True),
        sa.Column("needs_gpu_memory_gib", sa.Float, nullable=True),
        sa.Column("wait_reason", sa.Text, nullable=True),
        sa.UniqueConstraint("model", "request_id", name="uq_version_request"),
    )
    sa.Table(
        "workers",
        metadata,
        sa.Column("worker_id", sa.String(200), primary_key=True),
        sa.Column("cuda", sa.Boolean, nullable=False),
        sa.Column("gpu_memory_gib", sa.Float, nullable=False),
        sa.Column("gptq", sa.Boolean, nullable=False),
        sa.Column("started", sa.Float, nullable=False),
        sa.Column("last_seen", sa.Float, nullable=False, index=True),
        sa.Column("ttl_seconds", sa.Float, nullable=False),
    )
    sa.Table(
        "pending_dataset_references",
        metadata,
        sa.Column("referrer", sa.String(400), primary_key=True),
        sa.Column("dataset_version", sa.String(400), nullable=False),
        sa.Column("since", sa.Float, nullable=False),
    )
    sa.Table(
        "events",
        metadata,
        sa.Column("version", sa.String(400), primary_key=True),
        sa.Column("sequence", sa.Integer, primary_key=True),
        sa.Column("time", sa.Float, nullable=False),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("payload", sa.JSON, nullable=False),
    )
    return metadata


def upgrade() -> None:
    create_or_complete(op.get_bind(), baseline())


def downgrade() -> None:
    raise RuntimeError("the baseline cannot be undone: it would drop every table of the trainer")
