"""API keys of the dataset service's store: created, listed, revoked and looked up.

Only the SHA-256 of a key is stored (`auth.key_hash`); the whole key exists once, in the
response that creates it (or in the admin key file the first start writes). Deleting an
app revokes its keys (`catalog.delete_app`), so an app created again later under the same
id does not inherit them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Connection, Engine, insert, select, update
from sqlalchemy.exc import IntegrityError

from loraforge.services.common.auth import (
    ADMIN,
    APP_SCOPES,
    Principal,
    key_hash,
    key_id_of,
    new_api_key,
    same_hash,
    unknown_key,
    write_secret_file,
)
from loraforge.services.common.errors import InvalidArgument, NotFound, invalid_field
from loraforge.services.dataset.catalog import app_row
from loraforge.services.dataset.pages import Page, next_page_token
from loraforge.services.dataset.tables import api_keys

MAX_DESCRIPTION_CHARS = 200


@dataclass(frozen=True)
class KeyRecord:
    """An API key as stored (never its secret)."""

    key_id: str
    app_id: str  # empty for an admin key
    scopes: tuple[str, ...]
    description: str
    create_time: float
    expire_time: float | None
    revoke_time: float | None

    @property
    def name(self) -> str:
        return f"apiKeys/{self.key_id}"

    @property
    def prefix(self) -> str:
        return f"lf_{self.key_id}"

    def active(self, now: float) -> bool:
        return self.revoke_time is None and (self.expire_time is None or self.expire_time > now)

    def principal(self) -> Principal:
        return Principal(
            name=self.name,
            app=self.app_id,
            scopes=frozenset(self.scopes),
            expire_time=self.expire_time,
        )


def check_scopes(app_id: str, scopes: Sequence[str]) -> tuple[str, ...]:
    """The scopes of a new key, in order without repeats; INVALID_ARGUMENT when they do not fit."""
    chosen = tuple(dict.fromkeys(s.strip().lower() for s in scopes if s.strip()))
    if not chosen:
        raise invalid_field(
            "scopes",
            f"name at least one: `{ADMIN}` (with no app) or some of {', '.join(APP_SCOPES)}",
            reason="MISSING_SCOPES",
        )
    if ADMIN in chosen:
        if app_id or len(chosen) > 1:
            raise invalid_field(
                "scopes",
                f"`{ADMIN}` goes alone and with no app: an admin key may do everything everywhere",
                reason="INVALID_SCOPES",
            )
        return chosen
    unknown = [s for s in chosen if s not in APP_SCOPES]
    if unknown:
        raise invalid_field(
            "scopes",
            f"{', '.join(map(repr, unknown))} is not a scope; use some of {', '.join(APP_SCOPES)}"
            f", or `{ADMIN}` alone",
            reason="INVALID_SCOPES",
        )
    if not app_id:
        raise invalid_field(
            "app",
            f"is required for a key with scopes {', '.join(chosen)} (or ask for `{ADMIN}`)",
            reason="MISSING_APP",
        )
    return chosen


def _record(row: object) -> KeyRecord:
    return KeyRecord(
        key_id=row.key_id,  # type: ignore[attr-defined]
        app_id=row.app_id,  # type: ignore[attr-defined]
        scopes=tuple(s for s in row.scopes.split(",") if s),  # type: ignore[attr-defined]
        description=row.description,  # type: ignore[attr-defined]
        create_time=row.create_time,  # type: ignore[attr-defined]
        expire_time=row.expire_time,  # type: ignore[attr-defined]
        revoke_time=row.revoke_time,  # type: ignore[attr-defined]
    )


class ApiKeys:
    """The key table."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create(
        self,
        app_id: str,
        scopes: Sequence[str],
        *,
        ttl_seconds: float | None = None,
        description: str = "",
    ) -> tuple[KeyRecord, str]:
        """A new key for `app_id` ('' for an admin key): its record and the whole key."""
        chosen = check_scopes(app_id, scopes)
        if len(description) > MAX_DESCRIPTION_CHARS:
            raise invalid_field(
                "description", f"is {len(description)} characters; at most {MAX_DESCRIPTION_CHARS}"
            )
        if ttl_seconds is not None and ttl_seconds <= 0:
            raise invalid_field("ttl", "must be positive (leave it unset for a key that lasts)")
        now = time.time()
        expire = now + ttl_seconds if ttl_seconds else None
        key_id, key = new_api_key()
        with self.engine.begin() as conn:
            if app_id:
                app_row(conn, app_id)  # NotFound for an app that does not exist
            self._insert(conn, key_id, key, app_id, chosen, description, now, expire)
        return KeyRecord(key_id, app_id, chosen, description, now, expire, None), key

    @staticmethod
    def _insert(
        conn: Connection,
        key_id: str,
        key: str,
        app_id: str,
        scopes: tuple[str, ...],
        description: str,
        now: float,
        expire: float | None,
    ) -> None:
        conn.execute(
            insert(api_keys).values(
                key_id=key_id,
                key_hash=key_hash(key),
                app_id=app_id,
                scopes=",".join(scopes),
                description=description,
                create_time=now,
                expire_time=expire,
            )
        )

    def register_admin(self, key: str, description: str) -> KeyRecord:
        """Makes `key` (from an operator's setting) an admin key, if it is not one already."""
        key_id = key_id_of(key)
        if key_id is None:
            raise InvalidArgument(
                "the admin key setting is not a loraforge key (`lf_` + 12 hex digits + `_` + "
                "43 characters); leave it empty to have one made at the first start"
            )
        with self.engine.begin() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.key_id == key_id)).first()
            if row is not None:
                if not same_hash(row.key_hash, key_hash(key)):
                    raise InvalidArgument(
                        f"the admin key setting has the id of another key ({key_id}); "
                        "make a new one"
                    )
                return _record(row)
            now = time.time()
            try:
                self._insert(conn, key_id, key, "", (ADMIN,), description, now, None)
            except IntegrityError:
                pass  # another replica registered it first
        return self.lookup(key)

    def has_active_admin(self) -> bool:
        now = time.time()
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(api_keys.c.expire_time).where(
                    api_keys.c.app_id == "",
                    api_keys.c.scopes == ADMIN,
                    api_keys.c.revoke_time.is_(None),
                )
            ).all()
        return any(r.expire_time is None or r.expire_time > now for r in rows)

    def list(self, app_id: str, show_inactive: bool, page: Page) -> tuple[list[KeyRecord], str]:
        """Keys, oldest first: of `app_id` ('' for all), active ones unless `show_inactive`."""
        now = time.time()
        stmt = select(api_keys).where(api_keys.c.pk > page.after)
        if app_id:
            stmt = stmt.where(api_keys.c.app_id == app_id)
        if not show_inactive:
            stmt = stmt.where(
                api_keys.c.revoke_time.is_(None),
                (api_keys.c.expire_time.is_(None)) | (api_keys.c.expire_time > now),
            )
        with self.engine.connect() as conn:
            rows = conn.execute(stmt.order_by(api_keys.c.pk).limit(page.size + 1)).all()
        return [_record(r) for r in rows[: page.size]], next_page_token(rows, page, app_id)

    def revoke(self, key_id: str) -> KeyRecord:
        now = time.time()
        with self.engine.begin() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.key_id == key_id)).first()
            if row is None:
                raise NotFound(f"API key `apiKeys/{key_id}` does not exist", reason="KEY_NOT_FOUND")
            if row.revoke_time is None:
                conn.execute(
                    update(api_keys).where(api_keys.c.pk == row.pk).values(revoke_time=now)
                )
            row = conn.execute(select(api_keys).where(api_keys.c.pk == row.pk)).one()
        return _record(row)

    def lookup(self, key: str) -> KeyRecord:
        """The active key `key`; Unauthenticated for one unknown, revoked or expired."""
        key_id = key_id_of(key)
        if key_id is None:
            raise unknown_key()
        with self.engine.connect() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.key_id == key_id)).first()
        if row is None or not same_hash(row.key_hash, key_hash(key)):
            raise unknown_key()
        record = _record(row)
        if not record.active(time.time()):
            raise unknown_key()
        return record


def bootstrap_admin(keys: ApiKeys, key_file: Path, *, admin_key: str, new_admin_key: bool) -> str:
    """Makes sure an admin can get in: what the log should say about it.

    `admin_key` (an operator's setting) is registered. Otherwise, where no admin key is
    active (the first start) or `new_admin_key` is set, a new one is written to `key_file`.
    """
    if admin_key:
        record = keys.register_admin(admin_key, "from the admin_key setting")
        return f"admin key {record.prefix} from the admin_key setting"
    if keys.has_active_admin() and not new_admin_key:
        return f"admin keys exist; a new one is made with --new-admin-key (into {key_file})"
    record, key = keys.create("", [ADMIN], description="made at start")
    write_secret_file(key_file, key + "\n")
    return f"new admin key {record.prefix} written to {key_file} (mode 0600)"
