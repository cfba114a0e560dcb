"""Alembic's entry into the dataset store's revisions (see `common.migrations.run_env`)."""

from loraforge.services.common.migrations import run_env
from loraforge.services.dataset.migrations import REVISIONS
from loraforge.services.dataset.tables import METADATA

run_env(METADATA, REVISIONS)
