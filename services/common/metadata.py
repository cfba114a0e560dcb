"""Metadata store: SQLAlchemy 2, SQLite by default, any URL (e.g. PostgreSQL) later.

Each service declares its own tables on its own `DeclarativeBase` and opens its
own database; services never read each other's tables. The schema is created
on start; a column a table gained since its database was made is added then
(such columns are nullable: the rows from before read NULL). Database calls are
blocking: servicers run them with `asyncio.to_thread` so the event loop stays free.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, MetaData, create_engine, event, inspect
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.schema import CreateColumn


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers (watch streams, other processes) proceed while a worker writes.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def open_database(url: str, metadata: MetaData) -> tuple[Engine, sessionmaker[Session]]:
    """Opens the database at `url`, creates missing tables, returns engine and session factory."""
    if url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///")
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = create_engine(url, pool_pre_ping=True)
    metadata.create_all(engine)
    _add_missing_columns(engine, metadata)
    return engine, sessionmaker(engine, expire_on_commit=False)


def _add_missing_columns(engine: Engine, metadata: MetaData) -> None:
    """Adds the nullable columns a table has gained since the database was created."""
    inspector = inspect(engine)
    with engine.begin() as conn:
        for table in metadata.sorted_tables:
            present = {c["name"] for c in inspector.get_columns(table.name)}
            for column in table.columns:
                if column.name in present:
                    continue
                if not column.nullable:
                    raise RuntimeError(
                        f"table {table.name} lacks NOT NULL column {column.name}; "
                        "new columns must be nullable"
                    )
                ddl = CreateColumn(column).compile(dialect=engine.dialect)
                conn.exec_driver_sql(f"ALTER TABLE {table.name} ADD COLUMN {ddl}")
