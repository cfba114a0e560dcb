"""Evaluation results: the reference completion's perplexity under the model.

Revision ID: 0004_evaluation_perplexity
Revises: 0003_evaluations
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_evaluation_perplexity"
down_revision = "0003_evaluations"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("evaluation_results", sa.Column("perplexity", sa.Float, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("evaluation_results") as batch:
        batch.drop_column("perplexity")
