"""Apps and their datasets: creating, finding, listing, updating and deleting them.

An update changes only the fields it is given. Given the etag its caller read, it changes
the resource only if the resource still has that etag, checked again by the UPDATE itself
(compare-and-set on the fields the etag covers), so of two updates from one etag exactly
one wins and the other is Aborted.

Deleting a dataset deletes everything it holds (inputs, uploads, versions and their
references, request ids) in one transaction, then the snapshot objects no other version
names.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Connection, Engine, Row, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from loraforge.services.common.errors import AlreadyExists, FailedPrecondition, NotFound
from loraforge.services.common.updates import changed_meanwhile, check_etag
from loraforge.services.dataset import requests
from loraforge.services.dataset.domain import AppRecord, DatasetRecord
from loraforge.services.dataset.pages import Page, next_page_token
from loraforge.services.dataset.snapshots import Snapshots
from loraforge.services.dataset.tables import (
    api_keys,
    apps,
    datasets,
    inputs,
    uploads,
    version_refs,
    versions,
)


def app_row(conn: Connection, app_id: str) -> Row[Any]:
    row = conn.execute(select(apps).where(apps.c.app_id == app_id)).first()
    if row is None:
        raise NotFound(f"app `apps/{app_id}` does not exist", reason="APP_NOT_FOUND")
    return row


def dataset_row(conn: Connection, app_id: str, dataset_id: str) -> Row[Any]:
    """The dataset's row (with its `app_id`); NotFound names the app when that is what is missing."""
    row = conn.execute(
        select(datasets, apps.c.app_id)
        .join(apps, apps.c.pk == datasets.c.app_pk)
        .where(apps.c.app_id == app_id, datasets.c.dataset_id == dataset_id)
    ).first()
    if row is None:
        app_row(conn, app_id)
        raise NotFound(
            f"dataset `apps/{app_id}/datasets/{dataset_id}` does not exist",
            reason="DATASET_NOT_FOUND",
        )
    return row


class Catalog:
    """Blocking operations on apps and datasets."""

    def __init__(self, engine: Engine, snapshots: Snapshots) -> None:
        self.engine = engine
        self.snapshots = snapshots

    # Apps

    def create_app(self, app_id: str, description: str) -> AppRecord:
        now = time.time()
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    insert(apps).values(app_id=app_id, description=description, create_time=now)
                )
        except IntegrityError:
            raise AlreadyExists(
                f"app `apps/{app_id}` already exists; choose another id", reason="APP_EXISTS"
            ) from None
        return AppRecord(app_id, description, now)

    def get_app(self, app_id: str) -> AppRecord:
        with self.engine.connect() as conn:
            row = app_row(conn, app_id)
        return AppRecord(row.app_id, row.description, row.create_time)

    def update_app(self, app_id: str, *, description: str | None, etag: str = "") -> AppRecord:
        """Changes the fields given (None: unchanged); with `etag`, only if it is current."""
        name = f"app `apps/{app_id}`"
        with self.engine.begin() as conn:
            row = app_row(conn, app_id)
            current = AppRecord(row.app_id, row.description, row.create_time)
            check_etag(name, etag, current.etag)
            if description is None or description == row.description:
                return current
            stmt = update(apps).where(apps.c.pk == row.pk).values(description=description)
            if etag:
                stmt = stmt.where(apps.c.description == row.description)
            if not conn.execute(stmt).rowcount:
                raise changed_meanwhile(name)
        return AppRecord(row.app_id, description, row.create_time)

    def list_apps(self, page: Page, only: str | None = None) -> tuple[list[AppRecord], str]:
        """Apps, oldest first; only app `only` where it is given."""
        stmt = select(apps).where(apps.c.pk > page.after)
        if only is not None:
            stmt = stmt.where(apps.c.app_id == only)
        with self.engine.connect() as conn:
            rows = conn.execute(stmt.order_by(apps.c.pk).limit(page.size + 1)).all()
        records = [AppRecord(r.app_id, r.description, r.create_time) for r in rows[: page.size]]
        return records, next_page_token(rows, page, f"apps/{only}" if only else "")

    def delete_app(self, app_id: str, force: bool) -> None:
        released: list[str] = []
        with self.engine.begin() as conn:
            app = app_row(conn, app_id)
            dataset_rows = conn.execute(
                select(datasets.c.pk, datasets.c.dataset_id).where(datasets.c.app_pk == app.pk)
            ).all()
            if dataset_rows and not force:
                names = ", ".join(f"`{r.dataset_id}`" for r in dataset_rows[:5])
                raise FailedPrecondition(
                    f"app `apps/{app_id}` still has {len(dataset_rows)} dataset(s) ({names}); delete "
                    "them first, or set `force` to delete the app with all its data",
                    reason="APP_NOT_EMPTY",
                )
            for ds in dataset_rows:
                released += self._delete_dataset_rows(conn, ds.pk)
            conn.execute(delete(apps).where(apps.c.pk == app.pk))
            # An app made again later under this id does not inherit the old one's keys.
            conn.execute(
                update(api_keys)
                .where(api_keys.c.app_id == app_id, api_keys.c.revoke_time.is_(None))
                .values(revoke_time=time.time())
            )
        self.snapshots.release(released)

    # Datasets

    @staticmethod
    def _dataset_record(conn: Connection, row: Row[Any]) -> DatasetRecord:
        version_count = conn.execute(
            select(func.count()).select_from(versions).where(versions.c.dataset_pk == row.pk)
        ).scalar_one()
        return DatasetRecord(
            row.app_id,
            row.dataset_id,
            row.description,
            row.create_time,
            row.input_count,
            version_count,
        )

    def create_dataset(self, app_id: str, dataset_id: str, description: str) -> DatasetRecord:
        now = time.time()
        try:
            with self.engine.begin() as conn:
                app = app_row(conn, app_id)
                conn.execute(
                    insert(datasets).values(
                        app_pk=app.pk,
                        dataset_id=dataset_id,
                        description=description,
                        create_time=now,
                        input_count=0,
                    )
                )
        except IntegrityError:
            raise AlreadyExists(
                f"dataset `apps/{app_id}/datasets/{dataset_id}` already exists; choose another id",
                reason="DATASET_EXISTS",
            ) from None
        return DatasetRecord(app_id, dataset_id, description, now, 0, 0)

    def get_dataset(self, app_id: str, dataset_id: str) -> DatasetRecord:
        with self.engine.connect() as conn:
            return self._dataset_record(conn, dataset_row(conn, app_id, dataset_id))

    def update_dataset(
        self, app_id: str, dataset_id: str, *, description: str | None, etag: str = ""
    ) -> DatasetRecord:
        """Changes the fields given (None: unchanged); with `etag`, only if it is current."""
        name = f"dataset `apps/{app_id}/datasets/{dataset_id}`"
        with self.engine.begin() as conn:
            row = dataset_row(conn, app_id, dataset_id)
            check_etag(name, etag, self._dataset_record(conn, row).etag)
            if description is not None and description != row.description:
                stmt = (
                    update(datasets).where(datasets.c.pk == row.pk).values(description=description)
                )
                if etag:
                    stmt = stmt.where(datasets.c.description == row.description)
                if not conn.execute(stmt).rowcount:
                    raise changed_meanwhile(name)
            return self._dataset_record(conn, dataset_row(conn, app_id, dataset_id))

    def list_datasets(self, app_id: str, page: Page) -> tuple[list[DatasetRecord], str]:
        with self.engine.connect() as conn:
            app = app_row(conn, app_id)
            rows = conn.execute(
                select(datasets, apps.c.app_id)
                .join(apps, apps.c.pk == datasets.c.app_pk)
                .where(datasets.c.app_pk == app.pk, datasets.c.pk > page.after)
                .order_by(datasets.c.pk)
                .limit(page.size + 1)
            ).all()
            records = [self._dataset_record(conn, r) for r in rows[: page.size]]
        return records, next_page_token(rows, page, f"apps/{app_id}")

    def delete_dataset(self, app_id: str, dataset_id: str, force: bool) -> None:
        with self.engine.begin() as conn:
            ds = dataset_row(conn, app_id, dataset_id)
            if not force:
                refs = conn.execute(
                    select(versions.c.version_id, version_refs.c.referrer)
                    .join(version_refs, version_refs.c.version_pk == versions.c.pk)
                    .where(versions.c.dataset_pk == ds.pk)
                    .limit(5)
                ).all()
                if refs:
                    used = ", ".join(f"version `{r.version_id}` by `{r.referrer}`" for r in refs)
                    raise FailedPrecondition(
                        f"dataset `apps/{app_id}/datasets/{dataset_id}` has versions in use ({used}); "
                        "delete what uses them first, or set `force`",
                        reason="DATASET_VERSION_REFERENCED",
                    )
            released = self._delete_dataset_rows(conn, ds.pk)
        self.snapshots.release(released)

    def _delete_dataset_rows(self, conn: Connection, dataset_pk: int) -> list[str]:
        """Deletes a dataset and all it holds; returns snapshot keys no version names any more."""
        version_rows = conn.execute(
            select(versions.c.pk, versions.c.content_sha256, versions.c.snapshot_key).where(
                versions.c.dataset_pk == dataset_pk
            )
        ).all()
        pks = [v.pk for v in version_rows]
        if pks:
            conn.execute(delete(version_refs).where(version_refs.c.version_pk.in_(pks)))
            conn.execute(delete(versions).where(versions.c.pk.in_(pks)))
        conn.execute(delete(inputs).where(inputs.c.dataset_pk == dataset_pk))
        requests.delete_for_dataset(conn, dataset_pk)
        conn.execute(delete(uploads).where(uploads.c.dataset_pk == dataset_pk))
        conn.execute(delete(datasets).where(datasets.c.pk == dataset_pk))
        return self.snapshots.unshared(conn, version_rows)
