"""Models: the version chosen as the model's best (e.g. by a sweep's evaluations).

Revision ID: 0008_model_best_version
Revises: 0007_train_calibrations
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008_model_best_version"
down_revision = "0007_train_calibrations"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("models", sa.Column("best_version", sa.String(400), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.drop_column("best_version")
