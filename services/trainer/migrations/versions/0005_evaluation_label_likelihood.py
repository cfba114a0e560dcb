"""Evaluation results: whether the label the model finds likeliest is the reference's.

Revision ID: 0005_evaluation_label_likelihood
Revises: 0004_evaluation_perplexity
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_evaluation_label_likelihood"
down_revision = "0004_evaluation_perplexity"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("evaluation_results", sa.Column("label_likelihood", sa.Float, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("evaluation_results") as batch:
        batch.drop_column("label_likelihood")
