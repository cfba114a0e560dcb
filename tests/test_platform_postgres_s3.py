"""The whole workflow on production-like stores: every service's metadata on PostgreSQL and
every object on an S3-compatible server (moto), through the local cluster's processes, with
two training workers sharing the one job queue."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from loraforge.client import Client
from loraforge.client.local import LocalCluster
from loraforge.services.common.migrations import current_revision, head
from loraforge.services.common.objectstore import open_object_store
from loraforge.services.dataset.migrations import REVISIONS as DATASET_REVISIONS
from loraforge.services.trainer.migrations import REVISIONS as TRAINER_REVISIONS
from tests.support import Databases, postgres_available, s3_server
from tests.tiny_model import build_tiny_model

pytestmark = pytest.mark.slow

EXAMPLES = [(f"Question: what is {i} plus {i}? Answer:", f" {2 * i}") for i in range(24)]


@pytest.fixture
def databases(tmp_path: Path) -> Iterator[Databases]:
    """Fresh PostgreSQL databases, dropped afterwards (no SQLite half: that is the default)."""
    if why := postgres_available():
        pytest.skip(why)
    dbs = Databases("postgresql", tmp_path / "db")
    try:
        yield dbs
    finally:
        dbs.close()


def test_upload_version_train_and_predict_on_postgresql_and_s3(
    databases: Databases, tmp_path: Path
) -> None:
    tiny = build_tiny_model(tmp_path / "tiny-llama", corpus=[p + c for p, c in EXAMPLES])
    home = tmp_path / "home"
    with s3_server() as s3:
        objects_url = s3.url("loraforge", "e2e")
        cluster = LocalCluster(
            home=home,
            base_model=str(tiny),
            ports={"dataset": 0, "trainer": 0, "predictor": 0, "openai": 0},
            database_urls={
                "dataset": databases.url("dataset"),
                "trainer": databases.url("trainer"),
            },
            object_store_url=objects_url,
            workers=2,
            # transformers + PEFT: the tiny model serves at once, without vLLM's start-up.
            # The model root lets the run name the tiny model built under `tmp_path`.
            extra_env={
                "LORAFORGE_ENGINE": "transformers",
                "LORAFORGE_MODEL_ROOTS": f"tests={tmp_path}",
            },
        )
        try:
            cluster.start(timeout=300)
            with Client(**cluster.addresses, api_key=cluster.api_key()) as client:
                app = client.create_app("pg")
                dataset = app.create_dataset("sums")
                assert len(dataset.add_examples(EXAMPLES)) == len(EXAMPLES)
                version = dataset.create_version()
                assert version.stats.example_count == len(EXAMPLES)
                model = app.create_model("sums")
                model.get_params(template="HuggingFace_AdvancedConfig")
                model.update_params(
                    dataset_version=version,
                    model_config={
                        "pretrained_model_name_or_path": str(tiny),
                        "torch_dtype": "float32",
                    },
                    tokenizer_config={"model_max_length": 64},
                    trainer_config={
                        "max_steps": 4,
                        "per_device_train_batch_size": 8,
                        "eval_split_percent": 0,
                        "save_steps": 100,
                    },
                )
                # Two runs at once for two workers: each trains exactly once.
                version_ids = [model.train(), model.train()]
                for version_id in version_ids:
                    status = model.wait(version_id, timeout=600)
                    assert (status.state, status.status_code) == ("TRAINED", 21100), (
                        status.description
                    )
                    assert status.model_version.attempts == 1
                prediction = model.predict([EXAMPLES[3][0]], inference_params={"maxTokens": 3})
                assert prediction.outputs[0].completion_tokens > 0
                adapter_prefix = status.model_version.artifacts.adapter_prefix
        finally:
            cluster.stop()

        # The state is where the URLs say, none of it under `home`.
        assert not (home / "objects").exists()
        assert not list(home.glob("*.db"))
        store = open_object_store(objects_url)
        adapter = {info.key for info in store.list(adapter_prefix + "/")}
        assert f"{adapter_prefix}/adapter_model.safetensors" in adapter
        assert any(info.key.startswith("datasets/") for info in store.list(""))
    for name, revisions in (("dataset", DATASET_REVISIONS), ("trainer", TRAINER_REVISIONS)):
        engine = sa.create_engine(databases.url(name))
        try:
            assert current_revision(engine, revisions) == head(revisions)
            with engine.connect() as conn:
                table = "model_versions" if name == "trainer" else "versions"
                rows = 2 if name == "trainer" else 1
                assert conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one() == rows
        finally:
            engine.dispose()
