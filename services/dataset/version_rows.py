"""Version rows and the references that keep them: what a dataset version records.

A version row is inserted PENDING, turns IN_PROGRESS while its snapshot is written and
READY (with stats and the snapshot's hash and key) or FAILED (with a reason). A reference
names what uses a READY version (a model version, say); a version is deleted only once
nothing references it, and then its snapshot object once no other version names it.
After a restart, versions still PENDING or IN_PROGRESS were cut off mid-way and are
failed (`fail_interrupted_versions`). A version created with a request id is created once
per id (`requests.py`).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from sqlalchemy import Connection, Engine, Row, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from loraforge.services.common.errors import AlreadyExists, FailedPrecondition, NotFound
from loraforge.services.dataset import requests
from loraforge.services.dataset.catalog import dataset_row
from loraforge.services.dataset.domain import VersionRecord, VersionState, VersionStats
from loraforge.services.dataset.pages import Page, next_page_token
from loraforge.services.dataset.snapshots import Snapshots
from loraforge.services.dataset.stats import stats_from_json, stats_to_json
from loraforge.services.dataset.tables import version_refs, versions

log = logging.getLogger("loraforge.dataset.versions")


def fail_interrupted_versions(conn: Connection) -> None:
    """After a restart: fails the versions that were being written when the service stopped."""
    cut = conn.execute(
        update(versions)
        .where(versions.c.state.in_([VersionState.PENDING, VersionState.IN_PROGRESS]))
        .values(
            state=VersionState.FAILED,
            failure_reason="the service stopped while this version was being written; "
            "create a new version",
        )
    ).rowcount
    if cut:
        log.warning("%d dataset version(s) were cut off by a restart and marked failed", cut)


class VersionRows:
    """Blocking operations on version rows and their references."""

    def __init__(self, engine: Engine, snapshots: Snapshots) -> None:
        self.engine = engine
        self.snapshots = snapshots

    def _version_row(
        self, conn: Connection, app_id: str, dataset_id: str, version_id: str
    ) -> Row[Any]:
        ds = dataset_row(conn, app_id, dataset_id)
        row = conn.execute(
            select(versions).where(
                versions.c.dataset_pk == ds.pk, versions.c.version_id == version_id
            )
        ).first()
        if row is None:
            raise NotFound(
                f"version `apps/{app_id}/datasets/{dataset_id}/versions/{version_id}` does not exist",
                reason="DATASET_VERSION_NOT_FOUND",
            )
        return row

    def _version_record(
        self, conn: Connection, app_id: str, dataset_id: str, row: Row[Any]
    ) -> VersionRecord:
        refs = conn.execute(
            select(version_refs.c.referrer)
            .where(version_refs.c.version_pk == row.pk)
            .order_by(version_refs.c.referrer)
        ).scalars()
        return VersionRecord(
            app_id=app_id,
            dataset_id=dataset_id,
            version_id=row.version_id,
            description=row.description,
            state=VersionState(row.state),
            failure_reason=row.failure_reason,
            stats=stats_from_json(json.loads(row.stats)) if row.stats else None,
            content_sha256=row.content_sha256,
            snapshot_key=self.snapshots.public_key(row.snapshot_key),
            referenced_by=tuple(refs),
            create_time=row.create_time,
        )

    def create_version_row(
        self, app_id: str, dataset_id: str, version_id: str, description: str, request_id: str = ""
    ) -> tuple[int, int] | VersionRecord:
        """Inserts a PENDING version; returns (version_pk, dataset_pk).

        With a request id that an earlier call claimed, inserts nothing and returns the
        version that call created, as it is now.
        """
        now = time.time()
        try:
            with self.engine.begin() as conn:
                ds = dataset_row(conn, app_id, dataset_id)
                key = None
                if request_id:
                    key = requests.RequestKey(
                        request_id, requests.CREATE_DATASET_VERSION, ds.app_pk, ds.pk
                    )
                    claimed = requests.find(conn, key)
                    if claimed is not None:
                        return self._replayed(conn, app_id, dataset_id, ds.pk, claimed, request_id)
                if ds.input_count <= 0:
                    raise FailedPrecondition(
                        f"dataset `apps/{app_id}/datasets/{dataset_id}` has no inputs; upload "
                        "examples before creating a version",
                        reason="DATASET_EMPTY",
                    )
                result = conn.execute(
                    insert(versions).values(
                        dataset_pk=ds.pk,
                        version_id=version_id,
                        description=description,
                        state=VersionState.PENDING,
                        failure_reason="",
                        content_sha256="",
                        snapshot_key="",
                        create_time=now,
                    )
                )
                (version_pk,) = result.inserted_primary_key or (None,)
                if key is not None:
                    requests.claim(conn, key, now=now, result={"version_id": version_id})
        except IntegrityError:
            if request_id:  # a concurrent call with the same request id may have claimed it
                with self.engine.connect() as conn:
                    ds = dataset_row(conn, app_id, dataset_id)
                    key = requests.RequestKey(
                        request_id, requests.CREATE_DATASET_VERSION, ds.app_pk, ds.pk
                    )
                    claimed = requests.find(conn, key)
                    if claimed is not None:
                        return self._replayed(conn, app_id, dataset_id, ds.pk, claimed, request_id)
            raise AlreadyExists(
                f"version `apps/{app_id}/datasets/{dataset_id}/versions/{version_id}` already "
                "exists; choose another id",
                reason="DATASET_VERSION_EXISTS",
            ) from None
        assert version_pk is not None
        return int(version_pk), ds.pk

    def _replayed(
        self,
        conn: Connection,
        app_id: str,
        dataset_id: str,
        dataset_pk: int,
        claimed: requests.Claim,
        request_id: str,
    ) -> VersionRecord:
        version_id = (claimed.result or {})["version_id"]
        row = conn.execute(
            select(versions).where(
                versions.c.dataset_pk == dataset_pk, versions.c.version_id == version_id
            )
        ).first()
        if row is None:
            raise NotFound(
                f"request_id {request_id!r} created version "
                f"`apps/{app_id}/datasets/{dataset_id}/versions/{version_id}`, which has been "
                "deleted since; send a new request_id to create another version",
                reason="DATASET_VERSION_NOT_FOUND",
            )
        return self._version_record(conn, app_id, dataset_id, row)

    def set_version_state(
        self,
        version_pk: int,
        state: VersionState,
        *,
        failure_reason: str = "",
        stats: VersionStats | None = None,
        content_sha256: str = "",
        snapshot_key: str = "",
    ) -> None:
        values: dict[str, Any] = {"state": state, "failure_reason": failure_reason}
        if stats is not None:
            values.update(
                stats=json.dumps(stats_to_json(stats)),
                content_sha256=content_sha256,
                snapshot_key=snapshot_key,
            )
        with self.engine.begin() as conn:
            conn.execute(update(versions).where(versions.c.pk == version_pk).values(**values))

    def get_version(self, app_id: str, dataset_id: str, version_id: str) -> VersionRecord:
        with self.engine.connect() as conn:
            row = self._version_row(conn, app_id, dataset_id, version_id)
            return self._version_record(conn, app_id, dataset_id, row)

    def list_versions(
        self, app_id: str, dataset_id: str, page: Page
    ) -> tuple[list[VersionRecord], str]:
        with self.engine.connect() as conn:
            ds = dataset_row(conn, app_id, dataset_id)
            rows = conn.execute(
                select(versions)
                .where(versions.c.dataset_pk == ds.pk, versions.c.pk > page.after)
                .order_by(versions.c.pk)
                .limit(page.size + 1)
            ).all()
            records = [self._version_record(conn, app_id, dataset_id, r) for r in rows[: page.size]]
        return records, next_page_token(rows, page, f"apps/{app_id}/datasets/{dataset_id}")

    def delete_version(self, app_id: str, dataset_id: str, version_id: str) -> None:
        with self.engine.begin() as conn:
            row = self._version_row(conn, app_id, dataset_id, version_id)
            if row.state in (VersionState.PENDING, VersionState.IN_PROGRESS):
                raise FailedPrecondition(
                    "the version is still being written; delete it once it is ready or failed",
                    reason="DATASET_VERSION_BUSY",
                )
            refs = list(
                conn.execute(
                    select(version_refs.c.referrer).where(version_refs.c.version_pk == row.pk)
                ).scalars()
            )
            if refs:
                raise FailedPrecondition(
                    f"version `{version_id}` is used by {', '.join(f'`{r}`' for r in refs[:5])}; "
                    "delete those first (they remove their references), then this version",
                    reason="DATASET_VERSION_REFERENCED",
                    metadata={"referenced_by": ",".join(refs[:20])},
                )
            conn.execute(delete(versions).where(versions.c.pk == row.pk))
            released = self.snapshots.unshared(conn, [row])
        self.snapshots.release(released)

    def add_reference(
        self, app_id: str, dataset_id: str, version_id: str, referrer: str
    ) -> VersionRecord:
        with self.engine.begin() as conn:
            row = self._version_row(conn, app_id, dataset_id, version_id)
            if row.state != VersionState.READY:
                raise FailedPrecondition(
                    f"version `{version_id}` is {VersionState(row.state).name.lower()}, not ready; only "
                    "a ready version can be used",
                    reason="DATASET_VERSION_NOT_READY",
                )
            exists = conn.execute(
                select(version_refs.c.referrer).where(
                    version_refs.c.version_pk == row.pk, version_refs.c.referrer == referrer
                )
            ).first()
            if exists is None:
                conn.execute(insert(version_refs).values(version_pk=row.pk, referrer=referrer))
            return self._version_record(conn, app_id, dataset_id, row)

    def remove_reference(
        self, app_id: str, dataset_id: str, version_id: str, referrer: str
    ) -> None:
        with self.engine.begin() as conn:
            row = self._version_row(conn, app_id, dataset_id, version_id)
            conn.execute(
                delete(version_refs).where(
                    version_refs.c.version_pk == row.pk, version_refs.c.referrer == referrer
                )
            )
