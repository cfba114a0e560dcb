"""Entry point: `python -m loraforge.services.dataset` (or `loraforge-dataset`)."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from loraforge.auth.v1 import auth_service_pb2, auth_service_pb2_grpc
from loraforge.dataset.v1 import dataset_service_pb2, dataset_service_pb2_grpc
from loraforge.services.common.auth import parse_service_keys
from loraforge.services.common.config import (
    ENV_PREFIX,
    ServerConfig,
    describe,
    load_config,
    setting,
)
from loraforge.services.common.errors import InvalidArgument
from loraforge.services.common.logs import setup_logging
from loraforge.services.common.objectstore import open_object_store
from loraforge.services.common.server import (
    ServiceBinding,
    check_exposure,
    run_main,
    serve,
    shutdown_reserve,
)
from loraforge.services.dataset.auth_servicer import AuthServicer, LocalVerifier
from loraforge.services.dataset.keys import ApiKeys, bootstrap_admin
from loraforge.services.dataset.servicer import DatasetServicer
from loraforge.services.dataset.store import DatasetStore
from loraforge.services.dataset.uploads import Uploader
from loraforge.services.dataset.versions import Versions

SERVICE_NAME = dataset_service_pb2.DESCRIPTOR.services_by_name["DatasetService"].full_name
AUTH_SERVICE_NAME = auth_service_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name
log = logging.getLogger("loraforge.dataset")
# The dataset service writes only under this prefix of the shared object store.
OBJECT_PREFIX = "datasets"


@dataclass
class DatasetConfig(ServerConfig):
    """Settings of the dataset service."""

    max_example_chars: int = setting(
        100_000,
        "Longest row (its original text) an upload accepts, in characters; longer rows are rejected.",
    )
    upload_batch_rows: int = setting(
        5000, "Rows an upload parses before handing them to the database writer, as one batch."
    )
    admin_key_file: str = setting(
        "",
        "Where the first start (no admin key yet), or one with `new_admin_key`, writes a new "
        "admin key, mode 0600. Default `home`/admin.key.",
    )
    admin_key: str = setting(
        "", "An admin key to accept (say, from a Kubernetes Secret); none is made then."
    )
    new_admin_key: bool = setting(
        False, "Make another admin key at this start (into `admin_key_file`), as on the first."
    )
    service_keys: str = setting(
        "",
        "The services' own keys: `trainer=KEY,worker=KEY,predictor=KEY` (each service gets "
        "its KEY as its `service_key`).",
    )
    service_keys_file: str = setting(
        "", "File of `service=KEY` lines (`#` comments), as `service_keys`; both may be given."
    )
    lease_seconds: float = setting(
        30.0,
        "How long an upload or a version being written stays this server's without it "
        "renewing the lease (every third of this); after that, any replica sharing the "
        "database undoes it. Longer than a database hiccup, shorter than you would wait.",
    )

    def __post_init__(self) -> None:
        for name in ("max_example_chars", "upload_batch_rows", "lease_seconds"):
            value = getattr(self, name)
            if value < 1:
                raise InvalidArgument(
                    f"--{name.replace('_', '-')} ({ENV_PREFIX}{name.upper()}) must be at least 1 "
                    f"(got {value})"
                )


def service_identities(config: DatasetConfig) -> dict[str, str]:
    """{key hash: service} of the keys `service_keys` and `service_keys_file` name."""
    found = parse_service_keys(config.service_keys, describe("service_keys"))
    if config.service_keys_file:
        source = describe("service_keys_file")
        try:
            text = Path(config.service_keys_file).read_text()
        except OSError as exc:
            raise InvalidArgument(
                f"{source}: cannot read {config.service_keys_file!r} ({exc.strerror or exc})"
            ) from None
        found.update(parse_service_keys(text, source))
    return found


async def run(config: DatasetConfig) -> None:
    check_exposure(config, "dataset")
    identities = service_identities(config)
    objects = open_object_store(config.object_store_url_or_default()).scoped(OBJECT_PREFIX)
    store = await asyncio.to_thread(
        DatasetStore,
        config.database_url_for("dataset"),
        objects,
        OBJECT_PREFIX,
        config.home_path() / "tmp" / "dataset",
        lease_seconds=config.lease_seconds,
    )
    await asyncio.to_thread(store.start)
    uploader = Uploader(
        store.inputs,
        max_example_chars=config.max_example_chars,
        batch_rows=config.upload_batch_rows,
    )
    versions = Versions(store)
    keys = ApiKeys(store.engine)
    verifier = LocalVerifier(keys, identities, config.auth_cache_seconds)
    servicer = DatasetServicer(
        store,
        uploader,
        versions,
        max_example_chars=config.max_example_chars,
        keys_changed=verifier.cache.forget,
    )
    binding = ServiceBinding(
        SERVICE_NAME, servicer, dataset_service_pb2_grpc.add_DatasetServiceServicer_to_server
    )
    auth_binding = ServiceBinding(
        AUTH_SERVICE_NAME,
        AuthServicer(keys, verifier),
        auth_service_pb2_grpc.add_AuthServiceServicer_to_server,
    )
    if config.auth == "on":
        key_file = Path(config.admin_key_file or config.home_path() / "admin.key")
        said = await asyncio.to_thread(
            bootstrap_admin,
            keys,
            key_file,
            admin_key=config.admin_key,
            new_admin_key=config.new_admin_key,
        )
        log.info("auth on: %s; %d service identities", said, len(identities))

    async def close() -> None:
        # Uploads still running (their calls cancelled by now) stop at their next batch
        # and undo what they stored; what is not undone in time, a later recovery undoes.
        reserve = shutdown_reserve(config.shutdown_grace_seconds)
        await asyncio.to_thread(uploader.stop, reserve * 0.8)
        await asyncio.to_thread(store.close)

    await serve(
        [binding, auth_binding], config, label="dataset", verifier=verifier, on_shutdown=[close]
    )


def main(argv: Sequence[str] | None = None) -> int:
    async def start() -> None:
        # Loaded inside `run_main`, so a bad setting is one line and exit 2, not a traceback.
        config = load_config(DatasetConfig, argv, prog="loraforge-dataset")
        setup_logging(config.log_level, config.log_format, service="dataset")
        await run(config)

    return run_main(start())


if __name__ == "__main__":
    sys.exit(main())
