"""A file far larger than the memory it may use goes through UploadInputs in bounded memory."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import psutil
import pytest

from loraforge.dataset.v1 import dataset_service_pb2 as pb
from loraforge.dataset.v1 import dataset_service_pb2_grpc as pb_grpc
from tests.support import channel, start_service

FILE_BYTES = 210 * 1024 * 1024
CHUNK_BYTES = 1024 * 1024
RSS_GROWTH_LIMIT = 150 * 1024 * 1024
BAD_EVERY = 10_000  # one unparseable line in every this many


def generated_file(total: int) -> Iterator[tuple[bytes, int, int]]:
    """Yields (chunk, good rows in it, bad rows in it) until `total` bytes: never the whole file."""
    filler = "lorem ipsum dolor sit amet " * 25
    line_number = 0
    buffered: list[bytes] = []
    size = good = bad = sent = 0
    while sent < total:
        line_number += 1
        if line_number % BAD_EVERY == 0:
            line = b'{"prompt": "cut off in the middle\n'
            bad += 1
        else:
            row = {
                "prompt": f"Question {line_number}: {filler}",
                "completion": f"Answer {line_number}.",
            }
            line = (json.dumps(row) + "\n").encode()
            good += 1
        buffered.append(line)
        size += len(line)
        if size >= CHUNK_BYTES:
            yield b"".join(buffered), good, bad
            sent += size
            buffered, size, good, bad = [], 0, 0, 0
    if buffered:
        yield b"".join(buffered), good, bad


class PeakRss(threading.Thread):
    """Samples a process's resident memory until stopped; keeps the peak."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.peak = self.process.memory_info().rss
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.05):
            self.peak = max(self.peak, self.process.memory_info().rss)


@pytest.mark.slow
def test_a_210_mb_upload_keeps_server_memory_growth_under_150_mb(tmp_path) -> None:  # type: ignore[no-untyped-def]
    svc = start_service("loraforge.services.dataset", tmp_path)
    try:
        stub = pb_grpc.DatasetServiceStub(channel(svc.address))
        stub.CreateApp(pb.CreateAppRequest(app_id="big"))
        stub.CreateDataset(pb.CreateDatasetRequest(parent="apps/big", dataset_id="d"))
        dataset = "apps/big/datasets/d"
        # Warm up: the first upload imports and allocates what every upload needs.
        warm = [
            pb.UploadInputsRequest(header=pb.UploadHeader(dataset=dataset, file_name="warm.jsonl")),
            pb.UploadInputsRequest(chunk=b'{"prompt": "warm", "completion": "up"}\n'),
        ]
        stub.UploadInputs(iter(warm))
        stub.DeleteInputs(pb.DeleteInputsRequest(parent=dataset, all=True))

        totals = {"good": 0, "bad": 0, "bytes": 0}

        def requests() -> Iterator[pb.UploadInputsRequest]:
            yield pb.UploadInputsRequest(
                header=pb.UploadHeader(dataset=dataset, file_name="big.jsonl")
            )
            for chunk, good, bad in generated_file(FILE_BYTES):
                totals["good"] += good
                totals["bad"] += bad
                totals["bytes"] += len(chunk)
                yield pb.UploadInputsRequest(chunk=chunk)

        sampler = PeakRss(svc.proc.pid)
        baseline = sampler.peak
        sampler.start()
        try:
            report = stub.UploadInputs(requests(), timeout=600)
        finally:
            sampler.stopped.set()
            sampler.join()
        growth = sampler.peak - baseline
        print(
            f"server RSS: baseline {baseline / 2**20:.0f} MiB, peak {sampler.peak / 2**20:.0f} MiB, growth {growth / 2**20:.0f} MiB"
        )

        assert totals["bytes"] >= 200 * 1024 * 1024
        assert report.bytes_read == totals["bytes"]
        assert report.rows_accepted == totals["good"]
        assert report.rows_rejected == totals["bad"] > 0
        assert report.rows_read == totals["good"] + totals["bad"]
        assert {e.code for e in report.row_errors} == {"INVALID_JSON"}
        assert report.row_errors[0].line == BAD_EVERY
        got = stub.GetDataset(pb.GetDatasetRequest(name=dataset)).dataset.input_count
        assert got == totals["good"]
        assert growth < RSS_GROWTH_LIMIT, f"server memory grew by {growth / 2**20:.0f} MiB"
    finally:
        svc.stop()
