"""Dataset versions: frozen, content-addressed snapshots of a dataset's inputs.

Creating a version freezes the dataset's finished inputs into a snapshot object
(`snapshots.py`); the version turns READY only after the snapshot is published. Reading
a version checks the whole snapshot against what the version recorded before it streams
any row; a missing or damaged snapshot fails the version and is DataLoss, saying to
create a new version (which writes the snapshot again).
"""

from __future__ import annotations

from collections.abc import Iterator

from loraforge.services.common.errors import Aborted, DataLoss, FailedPrecondition, Unavailable
from loraforge.services.common.resources import new_id
from loraforge.services.dataset.domain import InputRecord, VersionRecord, VersionState
from loraforge.services.dataset.store import DatasetStore

INTERNAL_FAILURE = (
    "an internal error stopped writing this version (the server log has the details); "
    "delete it and create the version again"
)


class Versions:
    """Creates and reads dataset versions (blocking; run off the event loop)."""

    def __init__(self, store: DatasetStore) -> None:
        self.rows = store.version_rows
        self.inputs = store.inputs
        self.snapshots = store.snapshots

    def create(
        self,
        app_id: str,
        dataset_id: str,
        version_id: str,
        description: str,
        request_id: str = "",
    ) -> VersionRecord:
        """Freezes the dataset's inputs now; returns the version READY, or FAILED with a reason.

        A version fails for what a user can act on: no finished inputs yet, or storage that
        is full or unreachable (the reason says which, and what to do). Any other error
        marks the version FAILED too, so it can be deleted, and then reaches the caller.
        With a request id an earlier call already carried, freezes nothing and returns the
        version that call created, as it is now (still being written, if it is); if that
        call's build failed, builds the version again under the same name.
        """
        version_id = version_id or new_id("v")
        created = self.rows.create_version_row(
            app_id, dataset_id, version_id, description, request_id
        )
        if isinstance(created, VersionRecord):
            return created
        version_pk, dataset_pk = created
        try:
            self.rows.start_build(version_pk)
            with self.snapshots.freeze(self.inputs.frozen_inputs(dataset_pk)) as frozen:
                self.rows.claim_snapshot(version_pk, frozen.sha256, frozen.key)
                self.snapshots.publish(frozen)
            self.rows.mark_ready(version_pk, frozen.stats)
        except Aborted:
            pass  # cut off and failed by recovery meanwhile: the version says so
        except (FailedPrecondition, Unavailable) as exc:
            self.rows.mark_failed(version_pk, exc.message)
        except Exception:
            self.rows.mark_failed(version_pk, INTERNAL_FAILURE)
            raise
        return self.rows.get_version(app_id, dataset_id, version_id)

    def read(
        self, app_id: str, dataset_id: str, version_id: str, batch_size: int
    ) -> Iterator[list[InputRecord]]:
        """Yields the version's inputs in frozen order, `batch_size` at a time."""
        version = self.rows.get_version(app_id, dataset_id, version_id)
        if version.state is not VersionState.READY or version.stats is None:
            raise FailedPrecondition(
                f"version `{version_id}` is {version.state.name.lower()}, not ready; "
                + (version.failure_reason or "wait until it is ready"),
                reason="DATASET_VERSION_NOT_READY",
            )
        name = f"apps/{app_id}/datasets/{dataset_id}/versions/{version_id}"
        try:
            return self.snapshots.open_read(
                name,
                self.snapshots.stored_key(version.snapshot_key),
                version.content_sha256,
                version.stats.example_count,
                batch_size,
            )
        except DataLoss as exc:
            self.rows.mark_lost(app_id, dataset_id, version_id, exc.message)
            raise
