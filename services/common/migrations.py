"""Schema migrations: each store's Alembic revisions, applied when its process starts.

Every store with a database (dataset, trainer) ships an Alembic script folder
inside its package (`<service>/migrations/`, found from the installed package):
`env.py`, which hands over to `run_env` here, and `versions/`, its revisions.
`upgrade` brings a database to the newest revision at start, one process at a
time (a PostgreSQL advisory lock; a lock file beside an SQLite file), so
replicas and workers starting together do not race. Each store records its
revision in a version table of its own (`alembic_version_<store>`), so stores
pointed at one database do not take each other's revisions for theirs.

Each store's first revision (its baseline) creates every table it had when
migrations began, and completes a database made before then by `create_all`
(no version table): it creates the tables such a database lacks and
adds the columns it lacks, which were all nullable. Rows already there stay as
they are, and the database is from then on at that revision. Later revisions
are ordinary Alembic migrations.
"""

from __future__ import annotations

import contextlib
import fcntl
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, MetaData, create_engine, inspect, make_url, text
from sqlalchemy.schema import CreateColumn


@dataclass(frozen=True)
class Revisions:
    """A store's revisions: its script folder and the table its database records them in."""

    store: str
    script_location: Path

    @property
    def version_table(self) -> str:
        return f"alembic_version_{self.store}"


def _config(revisions: Revisions, connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(revisions.script_location))
    config.attributes["connection"] = connection
    return config


def head(revisions: Revisions) -> str:
    """The store's newest revision."""
    revision = ScriptDirectory.from_config(_config(revisions)).get_current_head()
    assert revision is not None, f"{revisions.script_location} has no revisions"
    return revision


def current_revision(engine: Engine, revisions: Revisions) -> str | None:
    """The store's revision in the database; None before any (empty, or made by `create_all`)."""
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"version_table": revisions.version_table})
        return context.get_current_revision()


def upgrade(engine: Engine, revisions: Revisions) -> None:
    """Migrates the database to the store's newest revision."""
    with _migration_lock(engine), engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Held until this transaction ends: one process migrates, the others wait.
            key = zlib.crc32(revisions.version_table.encode()) & 0x7FFFFFFF
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
        command.upgrade(_config(revisions, conn), "head")


@contextlib.contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    """An exclusive lock beside an SQLite file while it migrates (nothing elsewhere)."""
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    if not database or database == ":memory:":
        yield
        return
    with open(f"{database}.migrate-lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def run_env(target_metadata: MetaData, revisions: Revisions) -> None:
    """What a store's `env.py` runs: its revisions, on the connection `upgrade` passes.

    From the `alembic` command line instead (say, to write a revision with
    `--autogenerate` against the store's tables, `target_metadata`), it connects to
    the configuration's `sqlalchemy.url`.
    """
    from alembic import context

    connection: Connection | None = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection, target_metadata, revisions)
        return
    url = context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("set sqlalchemy.url in the Alembic configuration to a database URL")
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(str(parsed.database)).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            _run(conn, target_metadata, revisions)
    finally:
        engine.dispose()


def _run(connection: Connection, target_metadata: MetaData, revisions: Revisions) -> None:
    from alembic import context

    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        version_table=revisions.version_table,
        # SQLite alters a table by copying it; later revisions need that for most changes.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def create_or_complete(connection: Connection, baseline: MetaData) -> None:
    """A baseline revision's upgrade: creates `baseline`'s tables, or completes them.

    A database made by `create_all` before migrations has some of these tables, maybe
    without columns added to them since; those columns were nullable and are added
    (their rows read NULL, as they did before). A missing NOT NULL column cannot be
    filled in, and is refused with the table and column named.
    """
    baseline.create_all(connection, checkfirst=True)
    inspector = inspect(connection)
    for table in baseline.sorted_tables:
        present = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in present:
                continue
            if not column.nullable:
                raise RuntimeError(
                    f"table {table.name} lacks NOT NULL column {column.name}, which a "
                    "database made before migrations cannot lack; restore it from a backup"
                )
            ddl = CreateColumn(column).compile(dialect=connection.dialect)
            connection.exec_driver_sql(f"ALTER TABLE {table.name} ADD COLUMN {ddl}")
