"""The container health check CLI against a real service process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO, free_port, start_service

MODULE = "loraforge.services.common.healthcheck"


def _healthcheck(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", MODULE, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def dataset_address(tmp_path_factory: pytest.TempPathFactory):
    svc = start_service("loraforge.services.dataset", tmp_path_factory.mktemp("dataset"))
    try:
        yield svc.address
    finally:
        svc.stop()


def test_serving_server_and_service_exit_zero(dataset_address: str) -> None:
    whole = _healthcheck(dataset_address)
    assert whole.returncode == 0, whole.stderr
    assert "SERVING" in whole.stdout
    one = _healthcheck(dataset_address, "loraforge.dataset.v1.DatasetService")
    assert one.returncode == 0, one.stderr


def test_unknown_service_exits_one(dataset_address: str) -> None:
    result = _healthcheck(dataset_address, "no.such.Service")
    assert result.returncode == 1
    assert "NOT_FOUND" in result.stderr


def test_unreachable_address_exits_one() -> None:
    result = _healthcheck(f"127.0.0.1:{free_port()}", "--timeout", "1")
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr or "DEADLINE_EXCEEDED" in result.stderr


def test_stopped_server_exits_one(tmp_path: Path) -> None:
    svc = start_service("loraforge.services.dataset", tmp_path)
    svc.stop()
    result = _healthcheck(svc.address, "--timeout", "1")
    assert result.returncode == 1
