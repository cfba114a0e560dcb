"""Alembic's entry into the trainer store's revisions (see `common.migrations.run_env`)."""

from loraforge.services.common.migrations import run_env
from loraforge.services.trainer.migrations import REVISIONS
from loraforge.services.trainer.store import Base

run_env(Base.metadata, REVISIONS)
