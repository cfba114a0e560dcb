"""A worker outlives its training process: a run killed for memory (by the worker's watchdog
over `--memory-limit-gib`, or with SIGKILL as the kernel's out-of-memory killer does) says so
with figures and is retried once with a smaller plan; a run no live worker has the memory
for is refused; and `loraforge up`'s supervisor starts a worker that died again."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from google.protobuf import json_format, struct_pb2

from loraforge.dataset.v1 import dataset_service_pb2 as dpb
from loraforge.dataset.v1 import dataset_service_pb2_grpc as dpb_grpc
from loraforge.services.trainer.store import EventKind, TrainerStore
from loraforge.services.trainer.workers import Workers
from loraforge.trainer.v1 import trainer_service_pb2 as pb
from loraforge.trainer.v1 import trainer_service_pb2_grpc as pb_grpc
from tests.support import (
    REPO,
    channel,
    error_details,
    start_service,
    stop_process,
    wait_until,
)
from tests.tiny_model import build_tiny_model

pytestmark = pytest.mark.slow

APP = "apps/mem"
TEMPLATE = "templates/HF_Llama_3_2_1b_instruct_lora"
FINAL = (
    pb.MODEL_VERSION_STATE_TRAINED,
    pb.MODEL_VERSION_STATE_FAILED,
    pb.MODEL_VERSION_STATE_CANCELLED,
)
OOM_LINE = re.compile(
    r"out of memory at step (\d+): estimated (\d+\.\d\d) GiB, the worker had (\d+\.\d\d) GiB "
    r"\(peak RSS (\d+\.\d\d) GiB; ([^)]*)\)"
)


@dataclass
class Stack:
    workdir: Path
    dataset_address: str
    stub: pb_grpc.TrainerServiceStub
    dataset_version: str
    tiny: Path
    env: dict[str, str]

    def create(self, model: str, version: str, **trainer: Any) -> str:
        overrides = {
            "model_config": {"pretrained_model_name_or_path": str(self.tiny)},
            "peft_config": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
            "tokenizer_config": {"model_max_length": 64},
            "trainer_config": {
                "max_steps": 2,
                "logging_steps": 1,
                "save_steps": 2,
                "per_device_train_batch_size": 4,
                "gradient_accumulation_steps": 1,
                "eval_split_percent": 0,
                **trainer,
            },
        }
        return self.stub.CreateModelVersion(
            pb.CreateModelVersionRequest(
                parent=f"{APP}/models/{model}",
                version_id=version,
                template=TEMPLATE,
                dataset_version=self.dataset_version,
                param_overrides=json_format.ParseDict(overrides, struct_pb2.Struct()),
            )
        ).model_version.name

    def get(self, name: str) -> pb.ModelVersion:
        return self.stub.GetModelVersion(pb.GetModelVersionRequest(name=name)).model_version

    def wait_final(self, name: str, timeout: float = 300) -> pb.ModelVersion:
        assert wait_until(lambda: self.get(name).state in FINAL, timeout), self.lines(name)[-10:]
        return self.get(name)

    def events(self, name: str) -> list[Any]:
        return list(self.stub.GetModelVersionLogs(pb.GetModelVersionLogsRequest(name=name)).events)

    def lines(self, name: str) -> list[str]:
        return [e.log.message for e in self.events(name) if e.WhichOneof("kind") == "log"]

    def states(self, name: str) -> list[tuple[str, str]]:
        """The run's state changes, from its history in the trainer's database."""
        store = self._store()
        try:
            return [
                (e.payload["state"], e.payload.get("message", ""))
                for e in store.events_after(name, 0)
                if e.kind == EventKind.STATE
            ]
        finally:
            store.engine.dispose()

    def _store(self) -> TrainerStore:
        return TrainerStore(f"sqlite:///{self.workdir / 'home' / 'trainer.db'}")

    def live_workers(self) -> list[str]:
        store = self._store()
        try:
            return [w.worker_id for w in Workers(store).live()]
        finally:
            store.engine.dispose()


def _examples(n: int) -> bytes:
    rows = [
        {"prompt": f"Question: what is {i} plus {i}? Answer:", "completion": f" {2 * i}"}
        for i in range(n)
    ]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("worker-memory")
    tiny = build_tiny_model(workdir / "tiny-llama")
    env = {"LORAFORGE_MODEL_ROOTS": f"tests={workdir}"}
    dataset = start_service("loraforge.services.dataset", workdir)
    trainer = start_service(
        "loraforge.services.trainer", workdir, args=["--dataset-address", dataset.address], env=env
    )
    try:
        dstub = dpb_grpc.DatasetServiceStub(channel(dataset.address))
        dstub.CreateApp(dpb.CreateAppRequest(app_id="mem"))
        dstub.CreateDataset(dpb.CreateDatasetRequest(parent=APP, dataset_id="sums"))
        header = dpb.UploadHeader(dataset=f"{APP}/datasets/sums", file_name="sums.jsonl")
        dstub.UploadInputs(
            iter(
                [
                    dpb.UploadInputsRequest(header=header),
                    dpb.UploadInputsRequest(chunk=_examples(32)),
                ]
            )
        )
        dataset_version = dstub.CreateDatasetVersion(
            dpb.CreateDatasetVersionRequest(parent=f"{APP}/datasets/sums", version_id="v1")
        ).dataset_version.name
        stub = pb_grpc.TrainerServiceStub(channel(trainer.address))
        for model in ("watchdog", "killed", "retried"):
            stub.CreateModel(pb.CreateModelRequest(parent=APP, model_id=model))
        yield Stack(workdir, dataset.address, stub, dataset_version, tiny, env)
    finally:
        trainer.stop()
        dataset.stop()


def _worker(stack: Stack, *args: str) -> subprocess.Popen[bytes]:
    """A worker on the stack, with `args` added to its command line."""
    env = {
        **os.environ,
        "LORAFORGE_HOME": str(stack.workdir / "home"),
        "LORAFORGE_DATASET_ADDRESS": stack.dataset_address,
        "HF_HUB_OFFLINE": "1",
        **stack.env,
    }
    command = [sys.executable, "-m", "loraforge.services.trainer.worker", "--poll-seconds", "0.2"]
    with open(stack.workdir / "worker.log", "ab") as log:
        return subprocess.Popen(
            [*command, *args], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO
        )


def _training_process(worker: subprocess.Popen[bytes], other_than: int = 0) -> int:
    """The pid of the worker's training process (waits for one other than `other_than`)."""
    found: list[int] = []

    def started() -> bool:
        for child in psutil.Process(worker.pid).children():
            try:
                command = " ".join(child.cmdline())
            except psutil.Error:  # gone, or a zombie the worker has not reaped yet
                continue
            if "training_child" in command and child.pid != other_than:
                found[:] = [child.pid]
                return True
        return False

    assert wait_until(started, 120), "the worker started no training process"
    return found[0]


def _oom_lines(lines: list[str]) -> list[re.Match[str]]:
    return [m for m in (OOM_LINE.search(line) for line in lines) if m]


def test_a_run_over_the_memory_limit_is_killed_retried_once_smaller_then_failed(
    stack: Stack,
) -> None:
    # 50 MiB: less than any training process holds once PyTorch is imported, so the
    # watchdog kills the first attempt and the smaller retry alike.
    name = stack.create("watchdog", "v1", per_device_train_batch_size=4)
    worker = _worker(stack, "--memory-limit-gib", "0.05")
    try:
        version = stack.wait_final(name)
        lines = stack.lines(name)
        assert version.state == pb.MODEL_VERSION_STATE_FAILED, lines
        first, second = _oom_lines(lines)
        for match in (first, second):
            step, estimated, had, peak, cause = match.groups()
            assert step == "0" and float(estimated) > 0 and had == "0.05"
            assert float(peak) >= 0.05 and cause == "killed by the worker's memory watchdog"
        retrying = [line for line in lines if "retrying with micro-batch" in line]
        assert len(retrying) == 1, lines
        assert (
            "retrying with micro-batch 2 x 2 accumulation steps and gradient checkpointing"
            in (retrying[0])
        )
        assert "again after a retry with a smaller plan" in version.failure_reason
        assert "per_device_train_batch_size" in version.failure_reason
        assert "give the worker more memory" in version.failure_reason
        states = [state for state, _ in stack.states(name)]
        assert states == [
            "QUEUED",
            "TRAINING",
            "QUEUED",
            "TRAINING",
            "FAILED",
        ]
        # The worker lived through both kills, and says what memory it has: a run that
        # cannot fit it even at micro-batch 1 is refused, with the figures.
        assert worker.poll() is None
        assert len(stack.live_workers()) == 1
        with pytest.raises(grpc.RpcError) as refused:
            stack.create("watchdog", "v2")
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        reason, _ = error_details(refused.value)
        message = refused.value.details() or ""
        assert reason == "RUN_EXCEEDS_WORKER_MEMORY", message
        assert "even with micro-batch 1 and gradient checkpointing" in message
        assert "more than the 0.05 GiB of the largest live worker" in message
    finally:
        stop_process(worker)
    assert wait_until(lambda: not stack.live_workers(), 30)


def test_a_run_killed_twice_fails_and_the_worker_trains_the_next_run(stack: Stack) -> None:
    name = stack.create("killed", "v1", max_steps=400, save_steps=2)
    worker = _worker(stack)
    try:
        first = _training_process(worker)
        assert wait_until(lambda: stack.get(name).progress.step >= 2, 120)
        os.kill(first, signal.SIGKILL)
        # The retry starts a new training process: killed at once as well.
        second = _training_process(worker, other_than=first)
        os.kill(second, signal.SIGKILL)
        version = stack.wait_final(name)
        lines = stack.lines(name)
        assert version.state == pb.MODEL_VERSION_STATE_FAILED, lines
        kills = _oom_lines(lines)
        assert len(kills) == 2, lines
        assert int(kills[0].group(1)) >= 2
        assert all("killed with SIGKILL" in m.group(5) for m in kills)
        assert len([line for line in lines if "retrying with micro-batch" in line]) == 1
        assert "again after a retry with a smaller plan" in version.failure_reason
        # Two starts, but the retry is not one that a dead worker's lease used up.
        training = [m for s, m in stack.states(name) if s == "TRAINING"]
        assert len(training) == 2 and "smaller memory plan" in training[1]
        # The worker is still there, and trains the next run.
        assert worker.poll() is None
        following = stack.create("killed", "v2")
        assert stack.wait_final(following).state == pb.MODEL_VERSION_STATE_TRAINED
    finally:
        stop_process(worker)
    assert wait_until(lambda: not stack.live_workers(), 30)


def test_a_run_killed_once_resumes_smaller_from_its_checkpoint_and_trains(stack: Stack) -> None:
    name = stack.create("retried", "v1", max_steps=40, save_steps=2)
    worker = _worker(stack)
    try:
        first = _training_process(worker)
        assert wait_until(
            lambda: any(line.startswith("checkpoint at step") for line in stack.lines(name)), 120
        )
        os.kill(first, signal.SIGKILL)
        version = stack.wait_final(name)
        lines = stack.lines(name)
        assert version.state == pb.MODEL_VERSION_STATE_TRAINED, lines
        (kill,) = _oom_lines(lines)
        assert int(kill.group(1)) >= 2 and "killed with SIGKILL" in kill.group(5)
        retrying = next(line for line in lines if "retrying with micro-batch" in line)
        assert "micro-batch 2 x 2 accumulation steps" in retrying
        assert "from checkpoint step" in retrying
        assert any(line.startswith("resuming from checkpoint step") for line in lines), lines
        assert version.metrics["global_step"] == 40
    finally:
        stop_process(worker)
    assert wait_until(lambda: not stack.live_workers(), 30)


def test_the_supervisor_of_up_starts_a_killed_worker_again(stack: Stack) -> None:
    pid_file = stack.workdir / "supervised.pid"
    env = {
        **os.environ,
        "LORAFORGE_HOME": str(stack.workdir / "home"),
        "HF_HUB_OFFLINE": "1",
        **stack.env,
    }
    log_path = stack.workdir / "supervised.log"
    command = [
        *(sys.executable, "-m", "loraforge.client.local", "supervise"),
        *("--pid-file", str(pid_file), "--"),
        *("loraforge.services.trainer.worker", "--dataset-address", stack.dataset_address),
        *("--poll-seconds", "0.2"),
    ]
    with open(log_path, "ab") as log:
        supervisor = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
        )
    try:

        def live_worker_of(pid: int) -> bool:
            return any(f"-{pid}-" in worker for worker in stack.live_workers())

        assert wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(), 60)
        first = int(pid_file.read_text())
        assert wait_until(lambda: live_worker_of(first), 120), log_path.read_text()
        os.kill(first, signal.SIGKILL)
        assert wait_until(
            lambda: (
                int(pid_file.read_text() or 0) != first
                and live_worker_of(int(pid_file.read_text()))
            ),
            120,
        ), log_path.read_text()
        assert "worker exited (code -9); restarting" in log_path.read_text()
        # Stopping the group (as `loraforge down` does) stops the worker for good.
        second = int(pid_file.read_text())
        os.killpg(supervisor.pid, signal.SIGTERM)
        assert supervisor.wait(60) == 0
        assert not psutil.pid_exists(second) or psutil.Process(second).status() == "zombie"
        assert int(pid_file.read_text()) == second
        assert not live_worker_of(second)
    finally:
        if supervisor.poll() is None:
            os.killpg(supervisor.pid, signal.SIGKILL)
            supervisor.wait()
