"""The dataset store's schema migrations (an Alembic script folder; see `common.migrations`)."""

from pathlib import Path

from loraforge.services.common.migrations import Revisions

REVISIONS = Revisions("dataset", Path(__file__).parent)
