"""Version rows and the references that keep them: what a dataset version records.

A version row is inserted PENDING, with a lease (`leases.py`) for the replica writing
it; it turns IN_PROGRESS while its snapshot is written, claims the snapshot's hash and key
before the object is published (`snapshots.py` says why), and ends READY (with stats) or
FAILED (with a reason), releasing the lease. A READY version whose snapshot turns out
missing or damaged is failed with what to do. A reference names what uses a READY
version (a model version, say); a version is deleted only once nothing references it,
and then its snapshot object once no other version names it. Versions still PENDING or
IN_PROGRESS whose lease has expired were cut off mid-way and are failed
(`recover_versions`). A version created with a request id is created once per id
(`requests.py`).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from sqlalchemy import Connection, Engine, Row, delete, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from loraforge.services.common.errors import Aborted, AlreadyExists, FailedPrecondition, NotFound
from loraforge.services.dataset import leases, requests
from loraforge.services.dataset.catalog import dataset_row
from loraforge.services.dataset.domain import VersionRecord, VersionState, VersionStats
from loraforge.services.dataset.leases import Leases
from loraforge.services.dataset.pages import Page, next_page_token
from loraforge.services.dataset.snapshots import Snapshots, lock_snapshots
from loraforge.services.dataset.stats import stats_from_json, stats_to_json
from loraforge.services.dataset.tables import leases as lease_rows
from loraforge.services.dataset.tables import version_refs, versions

log = logging.getLogger("loraforge.dataset.versions")


BUILDING = (VersionState.PENDING, VersionState.IN_PROGRESS)
INTERRUPTED = "the service stopped while this version was being written; create a new version"


def recover_versions(engine: Engine, owner: Leases) -> int:
    """Fails the versions being written whose lease has expired (any replica's); returns how many."""
    now = owner.clock()
    with engine.connect() as conn:
        candidates = list(
            conn.execute(
                select(versions.c.pk)
                .outerjoin(
                    lease_rows,
                    (lease_rows.c.kind == leases.VERSION) & (lease_rows.c.ref_pk == versions.c.pk),
                )
                .where(
                    versions.c.state.in_(BUILDING),
                    or_(lease_rows.c.ref_pk.is_(None), lease_rows.c.expires_at < now),
                )
            ).scalars()
        )
    cut = 0
    for pk in candidates:
        with engine.begin() as conn:
            if not owner.take_over(conn, leases.VERSION, pk):
                continue  # its owner renewed the lease meanwhile
            cut += conn.execute(
                update(versions)
                .where(versions.c.pk == pk, versions.c.state.in_(BUILDING))
                .values(
                    state=VersionState.FAILED,
                    failure_reason=INTERRUPTED,
                    content_sha256="",
                    snapshot_key="",
                )
            ).rowcount
    with engine.begin() as conn:  # leases of versions deleted with their dataset
        conn.execute(
            delete(lease_rows).where(
                lease_rows.c.kind == leases.VERSION,
                lease_rows.c.expires_at < now,
                lease_rows.c.ref_pk.not_in(select(versions.c.pk)),
            )
        )
    if cut:
        log.warning(
            "%d dataset version(s) were cut off (their server stopped while writing them) "
            "and marked failed",
            cut,
        )
    return cut


def _lease_lost() -> Aborted:
    return Aborted(
        "this version was stopped while it was being written (its server stopped renewing "
        "its lease in time); create a new version",
        reason="VERSION_LEASE_LOST",
    )


class VersionRows:
    """Blocking operations on version rows and their references."""

    def __init__(self, engine: Engine, snapshots: Snapshots, leases_: Leases) -> None:
        self.engine = engine
        self.snapshots = snapshots
        self.leases = leases_

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
        version that call created, as it is now; unless that call's build failed (its
        server stopped, the store was unreachable), when the version is PENDING again under
        this call's lease and its (version_pk, dataset_pk) are returned, to build it again.
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
                        replayed = self._replayed(
                            conn, app_id, dataset_id, ds.pk, claimed, request_id
                        )
                        return self._rebuilt(conn, replayed, ds.pk) or replayed
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
                assert version_pk is not None
                self.leases.take(conn, leases.VERSION, int(version_pk))
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

    def _rebuilt(
        self, conn: Connection, version: VersionRecord, dataset_pk: int
    ) -> tuple[int, int] | None:
        """Makes a version whose build failed PENDING again, leased to this process, and
        returns (version_pk, dataset_pk); None if it did not fail, or failed after it was
        READY (a lost snapshot: rebuilding it would change what its users read)."""
        if version.state is not VersionState.FAILED or version.stats is not None:
            return None
        if version.referenced_by:
            return None
        row = conn.execute(
            select(versions.c.pk).where(
                versions.c.dataset_pk == dataset_pk, versions.c.version_id == version.version_id
            )
        ).one()
        rebuilt = conn.execute(
            update(versions)
            .where(versions.c.pk == row.pk, versions.c.state == VersionState.FAILED)
            .values(
                state=VersionState.PENDING,
                failure_reason="",
                content_sha256="",
                snapshot_key="",
            )
        ).rowcount
        if not rebuilt:
            return None  # another retry got there first
        conn.execute(
            delete(lease_rows).where(
                lease_rows.c.kind == leases.VERSION, lease_rows.c.ref_pk == row.pk
            )
        )
        self.leases.take(conn, leases.VERSION, int(row.pk))
        log.info(
            "rebuilding dataset version apps/%s/datasets/%s/versions/%s, whose first build "
            "failed (%s), for a retry of its request",
            version.app_id,
            version.dataset_id,
            version.version_id,
            version.failure_reason,
        )
        return int(row.pk), dataset_pk

    def start_build(self, version_pk: int) -> None:
        """PENDING to IN_PROGRESS; Aborted if the version's lease was lost."""
        with self.engine.begin() as conn:
            if not self.leases.renew(conn, leases.VERSION, version_pk):
                raise _lease_lost()
            conn.execute(
                update(versions)
                .where(versions.c.pk == version_pk)
                .values(state=VersionState.IN_PROGRESS)
            )

    def claim_snapshot(self, version_pk: int, content_sha256: str, snapshot_key: str) -> None:
        """Records the snapshot the version is about to publish, under the snapshot lock, so
        that collection keeps (or deletes before) its object; Aborted if the lease was lost."""
        with self.engine.begin() as conn:
            lock_snapshots(conn)
            if not self.leases.renew(conn, leases.VERSION, version_pk):
                raise _lease_lost()
            conn.execute(
                update(versions)
                .where(versions.c.pk == version_pk)
                .values(content_sha256=content_sha256, snapshot_key=snapshot_key)
            )

    def mark_ready(self, version_pk: int, stats: VersionStats) -> None:
        """IN_PROGRESS to READY once the snapshot is published; Aborted if the lease was lost."""
        with self.engine.begin() as conn:
            if not self.leases.release(conn, leases.VERSION, version_pk):
                raise _lease_lost()
            conn.execute(
                update(versions)
                .where(versions.c.pk == version_pk)
                .values(
                    state=VersionState.READY,
                    failure_reason="",
                    stats=json.dumps(stats_to_json(stats)),
                )
            )

    def mark_failed(self, version_pk: int, failure_reason: str) -> None:
        """A version this process was writing is FAILED with a reason (unless it lost it)."""
        with self.engine.begin() as conn:
            if not self.leases.release(conn, leases.VERSION, version_pk):
                return  # recovered by another replica, which failed it already
            # Dropping its claim on a snapshot can only leave an object no version names.
            conn.execute(
                update(versions)
                .where(versions.c.pk == version_pk, versions.c.state.in_(BUILDING))
                .values(
                    state=VersionState.FAILED,
                    failure_reason=failure_reason,
                    content_sha256="",
                    snapshot_key="",
                )
            )

    def mark_lost(self, app_id: str, dataset_id: str, version_id: str, failure_reason: str) -> None:
        """A READY version whose snapshot is missing or damaged is FAILED with `failure_reason`."""
        with self.engine.begin() as conn:
            row = self._version_row(conn, app_id, dataset_id, version_id)
            conn.execute(
                update(versions)
                .where(versions.c.pk == row.pk, versions.c.state == VersionState.READY)
                .values(state=VersionState.FAILED, failure_reason=failure_reason)
            )
        log.error(
            "dataset version apps/%s/datasets/%s/versions/%s failed: %s",
            app_id,
            dataset_id,
            version_id,
            failure_reason,
        )

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
