"""The dataset service's store: its metadata database and its snapshot objects, by concept.

SQLAlchemy Core on the service's own database (SQLite by default). Every call is blocking;
the servicer runs them off the event loop. The parts:

- `catalog`: apps and datasets (`catalog.py`)
- `inputs`: inputs and the uploads that store them (`inputs.py`, `input_writer.py`)
- `version_rows`: version rows and their references (`version_rows.py`)
- `snapshots`: the snapshot objects versions freeze their inputs into (`snapshots.py`)

The tables are in `tables.py`, pagination in `pages.py`.
"""

from __future__ import annotations

from pathlib import Path

from loraforge.services.common.metadata import open_database
from loraforge.services.common.objectstore import ObjectStore
from loraforge.services.dataset.catalog import Catalog
from loraforge.services.dataset.inputs import Inputs, recover_uploads
from loraforge.services.dataset.snapshots import Snapshots
from loraforge.services.dataset.tables import METADATA
from loraforge.services.dataset.version_rows import VersionRows, fail_interrupted_versions


class DatasetStore:
    """Opens the database and holds the store's parts."""

    def __init__(
        self, database_url: str, objects: ObjectStore, object_prefix: str, scratch: Path
    ) -> None:
        """`objects` is the service's part of the shared store, found there under
        `object_prefix`; `scratch` is a local folder for snapshots being written."""
        self.engine, _ = open_database(database_url, METADATA)
        self.snapshots = Snapshots(objects, object_prefix, scratch)
        self.catalog = Catalog(self.engine, self.snapshots)
        self.inputs = Inputs(self.engine)
        self.version_rows = VersionRows(self.engine, self.snapshots)

    def recover(self) -> None:
        """After a restart: undo uploads and fail versions that were cut off mid-way.

        Assumes one dataset service per database (the embedded default).
        """
        with self.engine.begin() as conn:
            recover_uploads(conn)
            fail_interrupted_versions(conn)

    def close(self) -> None:
        self.engine.dispose()
