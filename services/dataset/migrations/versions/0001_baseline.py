"""Baseline: the dataset service's tables when migrations began.

Revision ID: 0001_baseline
Revises:
Create Date: 2026-12-01

A database made before migrations (by `create_all`) is completed rather than
created: see `common.migrations.create_or_complete`. The tables are written out
here as they were at this revision, so later changes to `tables.py` do not
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
        "apps",
        metadata,
        sa.Column("pk", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("app_id", sa.String(63), nullable=False, unique=True),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("create_time", sa.Float, nullable=False),
        sqlite_autoincrement=True,
    )
    sa.Table(
        "datasets",
        metadata,
        sa.Column("pk", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("app_pk", sa.Integer, sa.ForeignKey("apps.pk"), nullable=False),
        sa.Column("dataset_id", sa.String(63), nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("create_time", sa.Float, nullable=False),
        # Maintained with every insert and delete, so listing datasets never counts rows.
        sa.Column("input_count", sa.BigInteger, nullable=False),
        sa.UniqueConstraint("app_pk", "dataset_id"),
        sqlite_autoincrement=True,
    )
    sa.Table(
        "uploads",
        metadata,
        sa.Column("pk", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("upload_id", sa.String(32), nullable=False, unique=True),
        sa.Column(
            "dataset_pk", sa.Integer, sa.ForeignKey("datasets.pk"), nullable=False, index=True
        ),
        sa.Column("file_name", sa.Text, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("start_time", sa.Float, nullable=False),
        sa.Column("end_time", sa.Float),
        sa.Column("report", sa.Text),
        sqlite_autoincrement=True,
    )
    sa.Table(
        "inputs",
        metadata,
        sa.Column("pk", sa.Integer, primary_key=True, autoincrement=True),
        # No foreign keys on this table: checking them costs every insert of every upload, and
        # inputs are only ever written for a dataset just looked up and deleted before it.
        sa.Column("dataset_pk", sa.Integer, nullable=False),
        sa.Column("kind", sa.SmallInteger, nullable=False),
        sa.Column("prompt", sa.Text, nullable=False),
        sa.Column("completion", sa.Text, nullable=False),
        sa.Column("raw", sa.Text, nullable=False),
        sa.Column("source_format", sa.SmallInteger, nullable=False),
        sa.Column("markup", sa.SmallInteger, nullable=False),
        sa.Column("source_line", sa.Integer, nullable=False),
        sa.Column("upload_pk", sa.Integer),
        sa.Column("concepts", sa.Text),  # JSON list, NULL when none
        sa.Column("metadata", sa.Text),  # JSON object, NULL when none
        sa.Column("content_hash", sa.BigInteger, nullable=False),
        sa.Column("create_time", sa.Float, nullable=False),
        sa.Index("ix_inputs_dataset_order", "dataset_pk", "pk"),
        sa.Index("ix_inputs_dataset_hash", "dataset_pk", "content_hash"),
        sqlite_autoincrement=True,
    )
    sa.Table(
        "versions",
        metadata,
        sa.Column("pk", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("dataset_pk", sa.Integer, sa.ForeignKey("datasets.pk"), nullable=False),
        sa.Column("version_id", sa.String(63), nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("state", sa.SmallInteger, nullable=False),
        sa.Column("failure_reason", sa.Text, nullable=False),
        sa.Column("stats", sa.Text),  # JSON of VersionStats, set when READY
        sa.Column("content_sha256", sa.String(64), nullable=False, index=True),
        sa.Column("snapshot_key", sa.Text, nullable=False),
        sa.Column("create_time", sa.Float, nullable=False),
        sa.UniqueConstraint("dataset_pk", "version_id"),
        sqlite_autoincrement=True,
    )
    sa.Table(
        "version_refs",
        metadata,
        sa.Column("version_pk", sa.Integer, sa.ForeignKey("versions.pk"), primary_key=True),
        sa.Column("referrer", sa.String(512), primary_key=True),
    )
    sa.Table(
        "request_ids",
        metadata,
        sa.Column("pk", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("app_pk", sa.Integer, sa.ForeignKey("apps.pk"), nullable=False),
        sa.Column("request_id", sa.String(200), nullable=False),
        sa.Column("method", sa.String(32), nullable=False),
        sa.Column(
            "dataset_pk", sa.Integer, sa.ForeignKey("datasets.pk"), nullable=False, index=True
        ),
        sa.Column("upload_pk", sa.Integer, sa.ForeignKey("uploads.pk"), index=True),
        sa.Column("result", sa.Text),
        sa.Column("create_time", sa.Float, nullable=False),
        sa.UniqueConstraint("app_pk", "request_id"),
        sqlite_autoincrement=True,
    )
    sa.Table(
        "leases",
        metadata,
        sa.Column("kind", sa.String(16), primary_key=True),
        sa.Column("ref_pk", sa.Integer, primary_key=True),
        sa.Column("owner", sa.String(128), nullable=False, index=True),
        sa.Column("expires_at", sa.Float, nullable=False),
    )
    sa.Table(
        "store_locks",
        metadata,
        sa.Column("name", sa.String(32), primary_key=True),
    )
    return metadata


def upgrade() -> None:
    create_or_complete(op.get_bind(), baseline())


def downgrade() -> None:
    raise RuntimeError("the baseline cannot be undone: it would drop every table of the dataset")
