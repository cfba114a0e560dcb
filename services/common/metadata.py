"""Metadata store: SQLAlchemy 2, SQLite by default, any URL (e.g. PostgreSQL) later.

Each service declares its own tables on its own `DeclarativeBase` and opens its
own database; services never read each other's tables. Its schema is its
Alembic revisions (`migrations.py`), applied on start: a new database is
created, one made before migrations is adopted, one at an older revision is
upgraded. Database calls are blocking: servicers run them with
`asyncio.to_thread` so the event loop stays free.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from loraforge.services.common.migrations import Revisions, upgrade


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers (watch streams, other processes) proceed while a worker writes.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _owner_only_sqlite(path: Path) -> None:
    """Creates the SQLite file readable by its owner only, and makes an existing one so:
    SQLite gives its -wal and -shm files the database file's mode."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.close(os.open(path, os.O_RDONLY | os.O_CREAT, 0o600))
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(FileNotFoundError, PermissionError):
            if file.stat().st_mode & 0o077:
                file.chmod(0o600)


def open_database(url: str, revisions: Revisions) -> tuple[Engine, sessionmaker[Session]]:
    """Opens the database at `url`, migrates it to the store's newest revision, returns
    engine and session factory."""
    if url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///")
        if path and path != ":memory:":
            _owner_only_sqlite(Path(path))
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = create_engine(url, pool_pre_ping=True)
    upgrade(engine, revisions)
    return engine, sessionmaker(engine, expire_on_commit=False)
