from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.support import Databases, postgres_available

# Tests never reach a model hub; everything they load is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Predictors choose their engine by rule, not by a background measurement of this (busy)
# machine that could switch engines in the middle of a test; the calibration tests turn it on.
os.environ.setdefault("LORAFORGE_CALIBRATE_ENGINES", "false")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def databases(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Databases]:
    """Fresh metadata databases for this module's tests, on SQLite and then on PostgreSQL.

    Services and stores take `databases.url("dataset")` (one database per name) as their
    database URL. Without a usable PostgreSQL server its half is skipped, saying why.
    """
    if request.param == "postgresql" and (why := postgres_available()):
        pytest.skip(why)
    dbs = Databases(request.param, tmp_path_factory.mktemp(f"db-{request.param}"))
    try:
        yield dbs
    finally:
        dbs.close()
