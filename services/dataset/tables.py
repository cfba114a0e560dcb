"""The dataset service's tables (SQLAlchemy Core) and how their columns are encoded.

Duplicates are found by `content_hash`, a 64-bit BLAKE2b of (kind, prompt, completion),
indexed per dataset. At 64 bits a false match needs billions of examples in one dataset.
Enum columns hold the numbers of the domain enums (`domain.py`); `concepts` and
`metadata` hold compact JSON, NULL when empty.

The database gets these tables from the revisions in `migrations/`: a change here
needs a revision there (`tests/test_metadata_migrations.py` compares the two).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
)

METADATA = MetaData()

apps = Table(
    "apps",
    METADATA,
    Column("pk", Integer, primary_key=True, autoincrement=True),
    Column("app_id", String(63), nullable=False, unique=True),
    Column("description", Text, nullable=False, default=""),
    Column("create_time", Float, nullable=False),
    sqlite_autoincrement=True,
)

datasets = Table(
    "datasets",
    METADATA,
    Column("pk", Integer, primary_key=True, autoincrement=True),
    Column("app_pk", Integer, ForeignKey("apps.pk"), nullable=False),
    Column("dataset_id", String(63), nullable=False),
    Column("description", Text, nullable=False, default=""),
    Column("create_time", Float, nullable=False),
    # Maintained with every insert and delete, so listing datasets never counts rows.
    Column("input_count", BigInteger, nullable=False, default=0),
    UniqueConstraint("app_pk", "dataset_id"),
    sqlite_autoincrement=True,
)

UPLOAD_RUNNING = "RUNNING"
UPLOAD_DONE = "DONE"
UPLOAD_FAILED = "FAILED"

uploads = Table(
    "uploads",
    METADATA,
    Column("pk", Integer, primary_key=True, autoincrement=True),
    Column("upload_id", String(32), nullable=False, unique=True),
    Column("dataset_pk", Integer, ForeignKey("datasets.pk"), nullable=False, index=True),
    Column("file_name", Text, nullable=False, default=""),
    Column("state", String(16), nullable=False),
    Column("start_time", Float, nullable=False),
    Column("end_time", Float),
    Column("report", Text),
    sqlite_autoincrement=True,
)

inputs = Table(
    "inputs",
    METADATA,
    Column("pk", Integer, primary_key=True, autoincrement=True),
    # No foreign keys on this table: checking them costs every insert of every upload, and
    # inputs are only ever written for a dataset just looked up and deleted before it.
    Column("dataset_pk", Integer, nullable=False),
    Column("kind", SmallInteger, nullable=False),
    Column("prompt", Text, nullable=False),
    Column("completion", Text, nullable=False),
    Column("raw", Text, nullable=False),
    Column("source_format", SmallInteger, nullable=False),
    Column("markup", SmallInteger, nullable=False),
    Column("source_line", Integer, nullable=False),
    Column("upload_pk", Integer),
    Column("concepts", Text),  # JSON list, NULL when none
    Column("metadata", Text),  # JSON object, NULL when none
    Column("content_hash", BigInteger, nullable=False),
    Column("create_time", Float, nullable=False),
    Index("ix_inputs_dataset_order", "dataset_pk", "pk"),
    Index("ix_inputs_dataset_hash", "dataset_pk", "content_hash"),
    sqlite_autoincrement=True,
)

versions = Table(
    "versions",
    METADATA,
    Column("pk", Integer, primary_key=True, autoincrement=True),
    Column("dataset_pk", Integer, ForeignKey("datasets.pk"), nullable=False),
    Column("version_id", String(63), nullable=False),
    Column("description", Text, nullable=False, default=""),
    Column("state", SmallInteger, nullable=False),
    Column("failure_reason", Text, nullable=False, default=""),
    Column("stats", Text),  # JSON of VersionStats, set when READY
    Column("content_sha256", String(64), nullable=False, default="", index=True),
    Column("snapshot_key", Text, nullable=False, default=""),
    Column("create_time", Float, nullable=False),
    UniqueConstraint("dataset_pk", "version_id"),
    sqlite_autoincrement=True,
)

version_refs = Table(
    "version_refs",
    METADATA,
    Column("version_pk", Integer, ForeignKey("versions.pk"), primary_key=True),
    Column("referrer", String(512), primary_key=True),
)

# A request id claimed by the first call that carried it (`requests.py`): bound to one
# method and dataset, with what that call returned as JSON (NULL while an upload runs).
request_ids = Table(
    "request_ids",
    METADATA,
    Column("pk", Integer, primary_key=True, autoincrement=True),
    Column("app_pk", Integer, ForeignKey("apps.pk"), nullable=False),
    Column("request_id", String(200), nullable=False),
    Column("method", String(32), nullable=False),
    Column("dataset_pk", Integer, ForeignKey("datasets.pk"), nullable=False, index=True),
    Column("upload_pk", Integer, ForeignKey("uploads.pk"), index=True),
    Column("result", Text),
    Column("create_time", Float, nullable=False),
    UniqueConstraint("app_pk", "request_id"),
    sqlite_autoincrement=True,
)

# Who works on a running upload or a version being written (`leases.py`): one row per
# piece of work, keyed by its kind and the pk of its `uploads` or `versions` row.
leases = Table(
    "leases",
    METADATA,
    Column("kind", String(16), primary_key=True),
    Column("ref_pk", Integer, primary_key=True),
    Column("owner", String(128), nullable=False, index=True),
    Column("expires_at", Float, nullable=False),
)

# Named rows that transactions lock to take turns (an UPDATE of the row: a row lock on
# PostgreSQL, the write lock on SQLite). `snapshots`: claiming and deleting snapshot objects.
store_locks = Table(
    "store_locks",
    METADATA,
    Column("name", String(32), primary_key=True),
)

# API keys (`keys.py`): the SHA-256 of each whole key, never the key. `app_id` is empty for
# an admin key; `scopes` is a comma-separated list.
api_keys = Table(
    "api_keys",
    METADATA,
    Column("pk", Integer, primary_key=True, autoincrement=True),
    Column("key_id", String(12), nullable=False, unique=True),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("app_id", String(63), nullable=False, index=True),
    Column("scopes", String(64), nullable=False),
    Column("description", Text, nullable=False, default=""),
    Column("create_time", Float, nullable=False),
    Column("expire_time", Float),
    Column("revoke_time", Float),
    sqlite_autoincrement=True,
)

# Longest `IN (...)` list one statement binds: under every database's bound-parameter limit.
IN_LIST_CHUNK = 900


def content_hash(kind: int, prompt: str, completion: str) -> int:
    """A signed 64-bit hash of what makes two examples the same."""
    key = f"{kind}:{len(prompt)}:{prompt}{completion}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big", signed=True)


def json_column(value: Any) -> str | None:
    """The stored form of `concepts` or `metadata`: compact JSON, or NULL when empty."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")) if value else None
