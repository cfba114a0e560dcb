"""gen/ must be exactly what `make gen` produces from proto/."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

from tests.support import REPO


def _files(root: Path) -> set[str]:
    return {
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_generated_code_is_up_to_date_with_protos(tmp_path: Path) -> None:
    out = tmp_path / "gen"
    subprocess.run(
        ["bash", "scripts/gen.sh", str(out)],
        cwd=REPO,
        check=True,
        capture_output=True,
        env={"PY": sys.executable, "PATH": "/usr/bin:/bin"},
    )
    committed = _files(REPO / "gen")
    fresh = _files(out)
    assert fresh == committed, (
        f"files differ: missing {fresh - committed}, extra {committed - fresh}; run `make gen`"
    )
    stale = [f for f in sorted(fresh) if not filecmp.cmp(out / f, REPO / "gen" / f, shallow=False)]
    assert not stale, f"gen/ is out of date with proto/ for {stale}; run `make gen` and commit"


def test_generated_packages_import_as_package_paths() -> None:
    from loraforge.dataset.v1 import dataset_service_pb2_grpc
    from loraforge.predictor.v1 import predictor_service_pb2
    from loraforge.trainer.v1 import trainer_service_pb2

    assert dataset_service_pb2_grpc.DatasetServiceStub
    assert trainer_service_pb2.ModelVersionState.Name(1) == "MODEL_VERSION_STATE_QUEUED"
    assert predictor_service_pb2.FinishReason.Value("FINISH_REASON_UNSPECIFIED") == 0
