"""Schema migrations of the dataset and trainer stores: an empty database upgraded to head
matches the models, and a database made by `create_all` before migrations keeps its rows
when its service starts and is at head afterwards. On SQLite and on PostgreSQL."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from loraforge.dataset.v1 import dataset_service_pb2 as dpb
from loraforge.dataset.v1 import dataset_service_pb2_grpc as dpb_grpc
from loraforge.services.common.migrations import Revisions, current_revision, head, upgrade
from loraforge.services.dataset import migrations as dataset_migrations
from loraforge.services.dataset.tables import METADATA as DATASET_METADATA
from loraforge.services.trainer import migrations as trainer_migrations
from loraforge.services.trainer import templates as tpl
from loraforge.services.trainer.store import Base as TrainerBase
from loraforge.trainer.v1 import trainer_service_pb2 as tpb
from loraforge.trainer.v1 import trainer_service_pb2_grpc as tpb_grpc
from tests.support import REPO, Databases, channel, running_service

STORES: dict[str, tuple[Revisions, sa.MetaData]] = {
    "dataset": (dataset_migrations.REVISIONS, DATASET_METADATA),
    "trainer": (trainer_migrations.REVISIONS, TrainerBase.metadata),
}
# What the trainer's tables lacked before workers advertised their hardware.
TRAINER_ADDITIONS = ("needs_cuda", "needs_gptq", "needs_gpu_memory_gib", "wait_reason")


@pytest.fixture
def engines(databases: Databases, request: pytest.FixtureRequest) -> Iterator[list[sa.Engine]]:
    """Engines the test opens, disposed of afterwards (PostgreSQL drops databases in use)."""
    opened: list[sa.Engine] = []
    yield opened
    for engine in opened:
        engine.dispose()


def _engine(engines: list[sa.Engine], url: str) -> sa.Engine:
    engine = sa.create_engine(url)
    engines.append(engine)
    return engine


@pytest.mark.parametrize("store", sorted(STORES))
def test_an_empty_database_upgraded_to_head_matches_the_models(
    databases: Databases, engines: list[sa.Engine], store: str
) -> None:
    revisions, metadata = STORES[store]
    engine = _engine(engines, databases.url(f"empty-{store}"))
    assert current_revision(engine, revisions) is None
    upgrade(engine, revisions)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"version_table": revisions.version_table})
        differences = compare_metadata(context, metadata)
    assert differences == []
    assert current_revision(engine, revisions) == head(revisions)
    upgrade(engine, revisions)  # at head already: nothing to do, nothing fails
    assert current_revision(engine, revisions) == head(revisions)


def test_the_stores_can_share_one_database_each_at_its_own_head(
    databases: Databases, engines: list[sa.Engine]
) -> None:
    engine = _engine(engines, databases.url("shared"))
    for revisions, _ in STORES.values():
        upgrade(engine, revisions)
    tables = set(sa.inspect(engine).get_table_names())
    for revisions, metadata in STORES.values():
        assert current_revision(engine, revisions) == head(revisions)
        assert set(metadata.tables) | {revisions.version_table} <= tables


MIGRATE = """
import sys
import sqlalchemy
from loraforge.services.common.migrations import upgrade
from loraforge.services.trainer.migrations import REVISIONS
sys.stdin.read()  # every process is started (imports done) before any migrates
upgrade(sqlalchemy.create_engine(sys.argv[1]), REVISIONS)
"""


def test_processes_starting_together_on_an_empty_database_take_turns_to_migrate(
    databases: Databases, engines: list[sa.Engine]
) -> None:
    revisions, _ = STORES["trainer"]
    url = databases.url("together")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", MIGRATE, url],
            stdin=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for _ in range(4)
    ]
    for proc in procs:  # all at once
        assert proc.stdin is not None
        proc.stdin.write("go")
        proc.stdin.close()
    errors = [proc.stderr.read() if proc.stderr else "" for proc in procs]
    for proc in procs:
        proc.wait(timeout=120)
    assert [proc.returncode for proc in procs] == [0] * 4, errors
    assert current_revision(_engine(engines, url), revisions) == head(revisions)


def _create_all_before_migrations(engine: sa.Engine, metadata: sa.MetaData) -> None:
    """What services did before migrations: `create_all` of the models of their day."""
    metadata.create_all(engine)
    if metadata is DATASET_METADATA:
        with engine.begin() as conn:
            conn.execute(sa.text("DROP TABLE api_keys"))  # added by 0002_api_keys
    if metadata is TrainerBase.metadata:
        with engine.begin() as conn:
            conn.execute(sa.text("DROP TABLE workers"))
            for table in ("evaluation_results", "evaluations"):  # added by 0003_evaluations
                conn.execute(sa.text(f"DROP TABLE {table}"))
            conn.execute(sa.text("DROP TABLE train_calibrations"))  # added by 0007
            for column in TRAINER_ADDITIONS:
                conn.execute(sa.text(f"ALTER TABLE model_versions DROP COLUMN {column}"))
            # added by 0002_continue_from_version
            conn.execute(sa.text("ALTER TABLE model_versions DROP COLUMN from_model_version"))
            # added by 0006_run_memory_retry
            conn.execute(sa.text("ALTER TABLE model_versions DROP COLUMN memory_retries"))
            # added by 0008_model_best_version
            conn.execute(sa.text("ALTER TABLE models DROP COLUMN best_version"))


def test_databases_made_before_migrations_keep_their_rows_and_are_at_head_once_served(
    databases: Databases, engines: list[sa.Engine], tmp_path: Path
) -> None:
    urls = {store: databases.url(f"legacy-{store}") for store in STORES}
    dataset_db = _engine(engines, urls["dataset"])
    trainer_db = _engine(engines, urls["trainer"])
    _create_all_before_migrations(dataset_db, DATASET_METADATA)
    _create_all_before_migrations(trainer_db, TrainerBase.metadata)
    now = time.time()
    with dataset_db.begin() as conn:
        conn.execute(
            DATASET_METADATA.tables["apps"].insert(),
            {"app_id": "old", "description": "made before migrations", "create_time": now},
        )
    smol = tpl.get_template("templates/HF_SmolLM2_135m_instruct_lora")
    old_tables = sa.MetaData()
    models = sa.Table("models", old_tables, autoload_with=trainer_db)
    versions = sa.Table("model_versions", old_tables, autoload_with=trainer_db)
    assert "needs_cuda" not in versions.c
    with trainer_db.begin() as conn:
        conn.execute(
            models.insert(),
            {
                "name": "apps/old/models/m",
                "app": "old",
                "description": "kept",
                "model_type": tpl.MODEL_TYPE,
                "latest_trained_version": "",
                "create_time": now,
            },
        )
        conn.execute(
            versions.insert(),
            {
                "name": "apps/old/models/m/versions/v1",
                "model": "apps/old/models/m",
                "template": smol.resource_name,
                "dataset_version": "apps/old/datasets/d/versions/1",
                "description": "",
                "param_overrides": {},
                "params": smol.defaults().to_dict(),
                "state": "FAILED",
                "status_code": 21106,
                "failure_reason": "out of memory",
                "progress": {},
                "metrics": {},
                "base_model": "",
                "adapter_prefix": "",
                "checkpoint_prefix": "",
                "adapter_bytes": 0,
                "create_time": now,
                "attempts": 1,
                "worker_id": "",
                "checkpoint_step": 0,
                "checkpoint_key": "",
                "last_sequence": 0,
                "references_dataset": True,
            },
        )
    assert current_revision(dataset_db, STORES["dataset"][0]) is None
    assert current_revision(trainer_db, STORES["trainer"][0]) is None

    with (
        running_service(
            "loraforge.services.dataset", tmp_path, args=["--database-url", urls["dataset"]]
        ) as dataset,
        running_service(
            "loraforge.services.trainer",
            tmp_path,
            args=["--database-url", urls["trainer"], "--dataset-address", dataset.address],
        ) as trainer,
    ):
        app = dpb_grpc.DatasetServiceStub(channel(dataset.address)).GetApp(
            dpb.GetAppRequest(name="apps/old")
        )
        assert app.app.description == "made before migrations"
        stub = tpb_grpc.TrainerServiceStub(channel(trainer.address))
        model = stub.GetModel(tpb.GetModelRequest(name="apps/old/models/m")).model
        assert model.description == "kept"
        version = stub.GetModelVersion(
            tpb.GetModelVersionRequest(name="apps/old/models/m/versions/v1")
        ).model_version
        assert version.state == tpb.MODEL_VERSION_STATE_FAILED
        assert version.failure_reason == "out of memory"

    for store, engine in (("dataset", dataset_db), ("trainer", trainer_db)):
        revisions, metadata = STORES[store]
        assert current_revision(engine, revisions) == head(revisions)
        tables = set(sa.inspect(engine).get_table_names())
        assert set(metadata.tables) | {revisions.version_table} <= tables
    columns = {c["name"] for c in sa.inspect(trainer_db).get_columns("model_versions")}
    assert set(TRAINER_ADDITIONS) <= columns
    with trainer_db.connect() as conn:
        assert conn.execute(sa.text("SELECT needs_cuda FROM model_versions")).all() == [(None,)]


@pytest.mark.slow
def test_the_built_package_carries_every_stores_migrations(tmp_path: Path) -> None:
    """Services find their revisions in the installed package, not only in a checkout."""
    source = tmp_path / "source"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "node_modules")
    for part in ("gen", "services", "clients"):
        shutil.copytree(REPO / part, source / part, ignore=skip)
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / part, source / part)
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"),
            *("-w", str(tmp_path / "dist"), str(source)),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("loraforge-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for store in STORES:
        folder = f"loraforge/services/{store}/migrations"
        assert {
            f"{folder}/__init__.py",
            f"{folder}/env.py",
            f"{folder}/script.py.mako",
            f"{folder}/versions/0001_baseline.py",
        } <= names
