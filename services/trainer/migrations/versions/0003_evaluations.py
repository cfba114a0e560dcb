"""Evaluations of model versions and base models, and their per-example results.

Revision ID: 0003_evaluations
Revises: 0002_continue_from_version
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_evaluations"
down_revision = "0002_continue_from_version"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "evaluations",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(500), nullable=False, unique=True),
        sa.Column("parent", sa.String(400), nullable=False, index=True),
        sa.Column("model_version", sa.String(400), nullable=False),
        sa.Column("base_model", sa.Boolean, nullable=False),
        sa.Column("base_model_name", sa.Text, nullable=False),
        sa.Column("dataset_version", sa.String(400), nullable=False),
        sa.Column("metrics", sa.JSON, nullable=False),
        sa.Column("params", sa.JSON, nullable=False),
        sa.Column("prompt_like", sa.String(400), nullable=False),
        sa.Column("max_examples", sa.Integer, nullable=False),
        sa.Column("state", sa.String(20), nullable=False, index=True),
        sa.Column("completed_examples", sa.Integer, nullable=False),
        sa.Column("total_examples", sa.Integer, nullable=False),
        sa.Column("primary_score", sa.String(40), nullable=False),
        sa.Column("scores", sa.JSON, nullable=False),
        sa.Column("confusion", sa.JSON, nullable=False),
        sa.Column("labels", sa.JSON, nullable=False),
        sa.Column("warnings", sa.JSON, nullable=False),
        sa.Column("failure_reason", sa.Text, nullable=False),
        sa.Column("create_time", sa.Float, nullable=False),
        sa.Column("end_time", sa.Float, nullable=True),
        sa.Column("lease_expires", sa.Float, nullable=True),
    )
    op.create_table(
        "evaluation_results",
        sa.Column("evaluation", sa.String(500), primary_key=True),
        sa.Column("idx", sa.Integer, primary_key=True),
        sa.Column("input_name", sa.String(500), nullable=False),
        sa.Column("prompt", sa.Text, nullable=False),
        sa.Column("reference", sa.Text, nullable=False),
        sa.Column("output", sa.Text, nullable=False),
        sa.Column("predicted_label", sa.Text, nullable=False),
        sa.Column("completion_tokens", sa.Integer, nullable=False),
        sa.Column("finish_reason", sa.String(20), nullable=False),
        sa.Column("exact_match", sa.Float, nullable=True),
        sa.Column("label_accuracy", sa.Float, nullable=True),
        sa.Column("rouge1", sa.Float, nullable=True),
        sa.Column("rouge2", sa.Float, nullable=True),
        sa.Column("rouge_l", sa.Float, nullable=True),
        sa.Column("bleu", sa.Float, nullable=True),
    )


def downgrade() -> None:
    op.drop_table("evaluation_results")
    op.drop_table("evaluations")
