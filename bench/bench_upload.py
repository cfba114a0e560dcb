"""Upload throughput: a 1,000,000-row JSONL file through UploadInputs, end to end over gRPC.

Starts the dataset service as a subprocess (its own SQLite file and object folder in a
temporary home), streams a generated prompt/completion JSONL in 1 MiB chunks from a
real gRPC client, and prints rows/s and MB/s as seen by the client, from the first
chunk sent to the response received (parsing, validation, duplicate checks and the
database writes all included).

    python bench/bench_upload.py [--rows 1000000] [--chunk-kib 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from loraforge.dataset.v1 import dataset_service_pb2 as pb  # noqa: E402
from loraforge.dataset.v1 import dataset_service_pb2_grpc as pb_grpc  # noqa: E402
from loraforge.services.common.channels import ChannelSecurity, sync_channel  # noqa: E402
from tests.support import start_service  # noqa: E402

TOPICS = [
    "billing",
    "shipping",
    "returns",
    "accounts",
    "warranty",
    "sizing",
    "payments",
    "delivery",
]


def write_jsonl(path: Path, rows: int) -> int:
    """Writes `rows` distinct prompt/completion lines; returns the file size."""
    with path.open("w", encoding="utf-8") as fh:
        for i in range(rows):
            topic = TOPICS[i % len(TOPICS)]
            line = {
                "prompt": f"Customer #{i} asks about {topic}: when will order {i * 7919 % 1000003} arrive?",
                "completion": f" Order {i * 7919 % 1000003} ships within {i % 5 + 1} days ({topic}).",
            }
            fh.write(json.dumps(line) + "\n")
    return path.stat().st_size


def requests(path: Path, dataset: str, chunk: int) -> Iterator[pb.UploadInputsRequest]:
    yield pb.UploadInputsRequest(header=pb.UploadHeader(dataset=dataset, file_name=path.name))
    with path.open("rb") as fh:
        while data := fh.read(chunk):
            yield pb.UploadInputsRequest(chunk=data)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--chunk-kib", type=int, default=1024)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-upload-") as tmp:
        work = Path(tmp)
        data = work / "examples.jsonl"
        size = write_jsonl(data, args.rows)
        print(f"file: {args.rows:,} rows, {size / 1e6:.1f} MB")
        svc = start_service("loraforge.services.dataset", work)
        try:
            # Plaintext on loopback, no key: start_service runs the service with auth off.
            stub = pb_grpc.DatasetServiceStub(sync_channel(svc.address, ChannelSecurity()))
            stub.CreateApp(pb.CreateAppRequest(app_id="bench"))
            stub.CreateDataset(pb.CreateDatasetRequest(parent="apps/bench", dataset_id="upload"))
            server = psutil.Process(svc.proc.pid)
            cpu_before = server.cpu_times()
            load_before = os.getloadavg()[0]
            start = time.perf_counter()
            report = stub.UploadInputs(
                requests(data, "apps/bench/datasets/upload", args.chunk_kib * 1024)
            )
            seconds = time.perf_counter() - start
            cpu_after = server.cpu_times()
            cpu = (cpu_after.user - cpu_before.user) + (cpu_after.system - cpu_before.system)
        finally:
            svc.stop()
        if report.rows_accepted != args.rows:
            print(f"error: {report.rows_accepted:,} of {args.rows:,} rows stored", file=sys.stderr)
            return 1
        print(f"stored: {report.rows_accepted:,} rows in {seconds:.2f} s")
        print(f"throughput: {args.rows / seconds:,.0f} rows/s, {size / 1e6 / seconds:.1f} MB/s")
        # On a shared machine the wall-clock figure depends on the neighbours; the server's
        # own CPU time does not, so print it too.
        print(
            f"server CPU: {cpu:.1f} s ({args.rows / cpu:,.0f} rows per CPU-second); "
            f"{os.cpu_count()} CPUs, load average {load_before:.1f} before the upload"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
