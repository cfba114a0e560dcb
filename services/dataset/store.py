"""The dataset service's store: its metadata database and its snapshot objects, by concept.

SQLAlchemy Core on the service's own database (SQLite by default). Every call is blocking;
the servicer runs them off the event loop. The parts:

- `catalog`: apps and datasets (`catalog.py`)
- `inputs`: inputs and the uploads that store them (`inputs.py`, `input_writer.py`)
- `version_rows`: version rows and their references (`version_rows.py`)
- `snapshots`: the snapshot objects versions freeze their inputs into (`snapshots.py`)
- `leases`: which replica works on which upload or version (`leases.py`)

The tables are in `tables.py`, pagination in `pages.py`.
"""

from __future__ import annotations

from pathlib import Path

from loraforge.services.common.metadata import open_database
from loraforge.services.common.objectstore import ObjectStore
from loraforge.services.dataset import migrations
from loraforge.services.dataset.catalog import Catalog
from loraforge.services.dataset.inputs import Inputs, recover_uploads
from loraforge.services.dataset.leases import (
    DEFAULT_LEASE_SECONDS,
    LeaseKeeper,
    Leases,
    new_owner_id,
)
from loraforge.services.dataset.snapshots import Snapshots
from loraforge.services.dataset.version_rows import VersionRows, recover_versions


class DatasetStore:
    """Opens the database and holds the store's parts."""

    def __init__(
        self,
        database_url: str,
        objects: ObjectStore,
        object_prefix: str,
        scratch: Path,
        *,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
    ) -> None:
        """`objects` is the service's part of the shared store, found there under
        `object_prefix`; `scratch` is a local folder for snapshots being written."""
        self.engine, _ = open_database(database_url, migrations.REVISIONS)
        self.leases = Leases(self.engine, new_owner_id(), lease_seconds)
        self.snapshots = Snapshots(objects, object_prefix, scratch, self.engine)
        self.catalog = Catalog(self.engine, self.snapshots)
        self.inputs = Inputs(self.engine, self.leases)
        self.version_rows = VersionRows(self.engine, self.snapshots, self.leases)
        self._keeper: LeaseKeeper | None = None

    def recover(self) -> None:
        """Undoes uploads and fails versions that were cut off mid-way: those whose lease
        has expired, whichever replica held it; removes temporary files a killed server left.

        Replicas sharing the database keep their running work.
        """
        self.snapshots.remove_leftovers()
        recover_uploads(self.engine, self.leases)
        recover_versions(self.engine, self.leases)

    def start(self) -> None:
        """Recovers, then keeps this process's leases alive and recovers again every lease time."""
        self.recover()
        self._keeper = LeaseKeeper(self.leases, self.recover)
        self._keeper.start()

    def close(self) -> None:
        if self._keeper is not None:
            self._keeper.stop()
        self.engine.dispose()
