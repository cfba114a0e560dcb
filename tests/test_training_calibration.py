"""A worker's measurement of its machine's training throughput at start, through real services:
measured once and reused, the time estimate of a deployment no run has trained on yet, a
TRAINED run's figure taking over, and the templates' memory needs computed by the estimator."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from google.protobuf import json_format, struct_pb2

from loraforge.dataset.v1 import dataset_service_pb2 as dpb
from loraforge.dataset.v1 import dataset_service_pb2_grpc as dpb_grpc
from loraforge.services.common import base_models
from loraforge.services.trainer import calibration, hardware
from loraforge.services.trainer import templates as tpl
from loraforge.services.trainer.estimates import peak_memory
from loraforge.services.trainer.store import TrainCalibrationRow, TrainerStore
from loraforge.trainer.v1 import trainer_service_pb2 as pb
from loraforge.trainer.v1 import trainer_service_pb2_grpc as pb_grpc
from tests.support import (
    channel,
    start_service,
    start_worker,
    stop_process,
    wait_until,
)
from tests.tiny_model import build_tiny_model

pytestmark = pytest.mark.slow

APP = "apps/shop"
MODEL = f"{APP}/models/sums"
TEMPLATE = "templates/HF_Llama_3_2_1b_instruct_lora"
WORKER = "calibrating-worker"


@dataclass
class Stack:
    tiny: str  # the real path of the tiny model: what runs of it record as their base model
    stub: pb_grpc.TrainerServiceStub
    dataset_address: str
    dataset_version: str
    store: TrainerStore
    cache: calibration.CalibrationCache
    workdir: Path
    env: dict[str, str]
    addresses: list[str]  # CLI flags that reach the services


def _examples() -> bytes:
    rows = [
        {"prompt": f"Question: what is {i} plus {i}? Answer:", "completion": f" {2 * i}"}
        for i in range(24)
    ]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("calibration-stack")
    tiny = os.path.realpath(build_tiny_model(workdir / "tiny-llama"))
    env = {
        "LORAFORGE_MODEL_ROOTS": f"tests={workdir}",
        # The measurements go to a cache folder of this test's; the packaged base models
        # stay where this machine has them.
        "XDG_CACHE_HOME": str(workdir / "cache"),
        "LORAFORGE_BASE_MODEL_DIR": str(base_models.base_model_dir()),
    }
    dataset = start_service("loraforge.services.dataset", workdir)
    trainer = start_service(
        "loraforge.services.trainer",
        workdir,
        args=["--dataset-address", dataset.address],
        env=env,
    )
    try:
        dstub = dpb_grpc.DatasetServiceStub(channel(dataset.address))
        dstub.CreateApp(dpb.CreateAppRequest(app_id="shop"))
        dstub.CreateDataset(dpb.CreateDatasetRequest(parent=APP, dataset_id="sums"))
        header = dpb.UploadHeader(dataset=f"{APP}/datasets/sums", file_name="sums.jsonl")
        dstub.UploadInputs(
            iter(
                [dpb.UploadInputsRequest(header=header), dpb.UploadInputsRequest(chunk=_examples())]
            )
        )
        dataset_version = dstub.CreateDatasetVersion(
            dpb.CreateDatasetVersionRequest(parent=f"{APP}/datasets/sums", version_id="v1")
        ).dataset_version.name
        stub = pb_grpc.TrainerServiceStub(channel(trainer.address))
        stub.CreateModel(pb.CreateModelRequest(parent=APP, model_id="sums"))
        store = TrainerStore(f"sqlite:///{workdir / 'home' / 'trainer.db'}")
        cache = calibration.CalibrationCache(
            workdir / "cache" / "loraforge" / "training-calibration.json"
        )
        addresses = ["--dataset-address", dataset.address, "--trainer-address", trainer.address]
        yield Stack(
            tiny, stub, dataset.address, dataset_version, store, cache, workdir, env, addresses
        )
    finally:
        trainer.stop()
        dataset.stop()


def _overrides(stack: Stack) -> dict[str, Any]:
    return {
        "model_config": {"pretrained_model_name_or_path": stack.tiny},
        "peft_config": {"r": 4},
        "tokenizer_config": {"model_max_length": 64},
        "trainer_config": {
            "num_train_epochs": 1,
            "per_device_train_batch_size": 4,
            "eval_split_percent": 0,
            "save_steps": 100,
        },
    }


def _plan(stack: Stack) -> calibration.Plan:
    """What a worker whose recommended template trained the tiny model would measure."""
    template = tpl.get_template(TEMPLATE)
    params = tpl.resolve_params(template, _overrides(stack))
    return calibration.Plan(
        template=template.name,
        params=params,
        base_model=stack.tiny,
        model_path=stack.tiny,
        folder=Path(stack.tiny),
        cuda=False,
        threads=1,
    )


def _rows(stack: Stack) -> list[TrainCalibrationRow]:
    with stack.store.sessions() as s:
        return list(s.query(TrainCalibrationRow).all())


def _estimate(stack: Stack) -> pb.EstimateModelVersionResponse:
    return stack.stub.EstimateModelVersion(
        pb.EstimateModelVersionRequest(
            parent=MODEL,
            template=TEMPLATE,
            dataset_version=stack.dataset_version,
            param_overrides=json_format.ParseDict(_overrides(stack), struct_pb2.Struct()),
        )
    )


def test_a_fresh_deployment_has_no_time_until_a_worker_measures_its_machine(stack: Stack) -> None:
    before = _estimate(stack)
    assert not before.HasField("estimated_time")
    assert "no worker has measured it at its start" in before.calibration


def test_the_throughput_is_measured_once_and_a_second_start_reuses_it(stack: Stack) -> None:
    calibrator = calibration.Calibrator(stack.store, WORKER, threading.Event(), cache=stack.cache)
    first = calibrator.run(_plan(stack))
    assert first is not None
    assert [n for n, _ in first.points] == [calibration.SHORT, calibration.LONG]
    assert all(rate > 0 for _, rate in first.points) and first.load_seconds > 0
    assert first.worker_id == WORKER and first.base_model == stack.tiny
    # Kept in the cache file and recorded in the trainer store.
    assert stack.cache.get(first.signature) == first
    assert [(r.signature, r.measured_at) for r in _rows(stack)] == [
        (first.signature, first.measured_at)
    ]

    second = calibration.Calibrator(
        stack.store, "another-start", threading.Event(), cache=stack.cache
    ).run(_plan(stack))
    # Not measured again: the same figures, and still one row in the store.
    assert second == first
    assert len(_rows(stack)) == 1


def test_with_no_trained_run_the_estimate_uses_the_machine_measurement_then_a_run_takes_over(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    measured = calibration.latest(stack.store, stack.tiny, "cpu")
    assert measured is not None  # the previous test's
    estimate = _estimate(stack)
    assert estimate.HasField("estimated_time")
    assert f"measured on worker {WORKER}'s machine at start" in estimate.calibration
    assert "no TRAINED run of this model yet" in estimate.calibration
    row_tokens = estimate.tokens_per_epoch / estimate.train_examples  # unpacked: one per example
    rate = measured.tokens_per_second(row_tokens)
    assert estimate.tokens_per_second == pytest.approx(rate)
    seconds = estimate.estimated_time.ToNanoseconds() / 1e9
    assert seconds == pytest.approx(estimate.total_tokens / rate + measured.load_seconds, rel=1e-3)
    # The CLI's estimate shows that time and its throughput.
    from loraforge.client.cli import main as cli_main

    args = [*stack.addresses, "train", "shop/sums", "--template", TEMPLATE, "--estimate"]
    args += ["--dataset-version", stack.dataset_version]
    for path, value in (
        ("model_config.pretrained_model_name_or_path", stack.tiny),
        ("peft_config.r", 4),
        ("tokenizer_config.model_max_length", 64),
        ("trainer_config.num_train_epochs", 1),
        ("trainer_config.per_device_train_batch_size", 4),
        ("trainer_config.eval_split_percent", 0),
    ):
        args += ["--set", f"{path}={value}"]
    capsys.readouterr()
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert f"(at {estimate.tokens_per_second:,.0f} tokens/s)" in out

    name = stack.stub.CreateModelVersion(
        pb.CreateModelVersionRequest(
            parent=MODEL,
            version_id="v1",
            template=TEMPLATE,
            dataset_version=stack.dataset_version,
            param_overrides=json_format.ParseDict(_overrides(stack), struct_pb2.Struct()),
        )
    ).model_version.name
    worker = start_worker(stack.workdir, stack.dataset_address, env=stack.env)
    try:

        def version() -> pb.ModelVersion:
            return stack.stub.GetModelVersion(pb.GetModelVersionRequest(name=name)).model_version

        assert wait_until(lambda: version().state == pb.MODEL_VERSION_STATE_TRAINED, 300), (
            version().failure_reason
        )
    finally:
        stop_process(worker)
    after = _estimate(stack)
    assert after.tokens_per_second == pytest.approx(version().metrics["tokens_per_second"])
    assert "median of the latest 1 TRAINED run(s)" in after.calibration


def test_a_worker_start_with_a_fresh_measurement_records_it_and_measures_nothing(
    stack: Stack,
) -> None:
    workdir = stack.workdir / "second-deployment"
    (workdir / "home").mkdir(parents=True)
    store = TrainerStore(f"sqlite:///{workdir / 'home' / 'trainer.db'}")
    # What `plan_for` reads of a worker with the default settings.
    worker_like = SimpleNamespace(
        capabilities=hardware.probe(),
        models=tpl.model_access((), False),
        config=SimpleNamespace(cpu_threads=0),
    )
    plan = calibration.plan_for(worker_like)  # type: ignore[arg-type]
    if plan is None:
        pytest.skip("the recommended template's base model is not on this machine")
    # This machine measured the recommended template's base model before (the figures are
    # the tiny model's: what is tested is that a fresh entry is not measured again).
    kept = calibration.latest(stack.store, stack.tiny, "cpu")
    assert kept is not None
    key = calibration.signature(plan.folder, plan.params, plan.cuda, plan.threads)
    stack.cache.put(dataclasses.replace(kept, signature=key, base_model=plan.base_model))
    worker = start_worker(
        workdir, stack.dataset_address, env={**stack.env, "LORAFORGE_CALIBRATE_TRAINING": "true"}
    )
    try:
        log = workdir / "worker.log"
        assert wait_until(lambda: "measured before" in log.read_text(), 120), log.read_text()
        assert wait_until(lambda: calibration.latest(store, plan.base_model, "cpu") is not None)
        assert "measuring the training throughput" not in log.read_text()
    finally:
        stop_process(worker)


def _needs_text(needs: tpl.MemoryNeeds) -> str:
    return (
        f"Needs about {needs.peak_bytes / 2**30:.1f} GiB of memory with its defaults "
        f"(batch {needs.batch}, model_max_length {needs.model_max_length})"
    )


def test_a_template_says_the_memory_the_estimator_computes_for_its_defaults(stack: Stack) -> None:
    shipped = tpl.get_template(TEMPLATE)
    template = dataclasses.replace(
        shipped,
        name="TinyForTests",
        parameters=tuple(
            dataclasses.replace(p, default=stack.tiny)
            if p.path == "model_config.pretrained_model_name_or_path"
            else p
            for p in shipped.parameters
        ),
    )
    params = template.defaults()
    length = params.tokenizer_config.model_max_length
    peak = peak_memory(params, stack.tiny, length, False)
    batch = params.trainer_config.per_device_train_batch_size
    hardware = tpl.hardware_of(template)
    assert (
        f"Needs about {peak / 2**30:.1f} GiB of memory with its defaults "
        f"(batch {batch}, model_max_length {length})"
    ) in hardware.summary
    gpu = peak_memory(params, stack.tiny, length, True)
    assert hardware.min_gpu_memory_gib >= round(gpu / 2**30, 1)
    assert f"{hardware.min_gpu_memory_gib:g} GiB or more" in hardware.summary
    # A template whose base model is not on this machine says nothing about its memory.
    assert "Needs about" not in tpl.hardware_of(shipped).summary


def test_listed_templates_carry_the_computed_memory_figure(stack: Stack) -> None:
    listed = stack.stub.ListTemplates(pb.ListTemplatesRequest()).templates
    computed = 0
    for message in listed:
        template = tpl.get_template(message.name)
        needs = tpl.memory_needs(template)
        if needs is None:
            assert message.hardware.estimated_peak_memory_bytes == 0
            assert "Needs about" not in message.hardware.summary
            continue
        computed += 1
        params = template.defaults()
        folder = calibration.local_folder(params.base_model)
        assert folder is not None
        length = params.tokenizer_config.model_max_length
        peak = peak_memory(params, str(folder), length, needs.cuda)
        assert message.hardware.estimated_peak_memory_bytes == peak
        assert _needs_text(needs) in message.hardware.summary
        assert f"{peak / 2**30:.1f} GiB" in message.hardware.summary
        # No hard-coded memory claim is left in the template's own words.
        assert not re.search(r"\d+ GiB of RAM", message.hardware.summary)
    if not computed:
        pytest.skip("no template's base model is on this machine")


def test_the_measurement_waits_while_its_worker_trains_a_run_and_runs_once_it_ends(
    stack: Stack,
) -> None:
    overrides = _overrides(stack)
    overrides["trainer_config"] = {**overrides["trainer_config"], "max_steps": 100_000}
    name = stack.stub.CreateModelVersion(
        pb.CreateModelVersionRequest(
            parent=MODEL,
            version_id="long",
            template=TEMPLATE,
            dataset_version=stack.dataset_version,
            param_overrides=json_format.ParseDict(overrides, struct_pb2.Struct()),
        )
    ).model_version.name

    def version() -> pb.ModelVersion:
        return stack.stub.GetModelVersion(pb.GetModelVersionRequest(name=name)).model_version

    worker = start_worker(
        stack.workdir, stack.dataset_address, env={**stack.env, "LORAFORGE_WORKER_ID": "busy"}
    )
    try:
        assert wait_until(lambda: version().state == pb.MODEL_VERSION_STATE_TRAINING, 120)
        # A cache of its own: nothing measured yet, so it measures.
        cache = calibration.CalibrationCache(stack.workdir / "cache-busy" / "calibration.json")
        calibrator = calibration.Calibrator(stack.store, "busy", threading.Event(), cache=cache)
        measured: list[calibration.Measurement | None] = []
        thread = threading.Thread(target=lambda: measured.append(calibrator.run(_plan(stack))))
        thread.start()
        assert wait_until(calibrator.paused.is_set, 60)
        assert calibrator.started == []  # no measurement while the worker trains
        stack.stub.CancelModelVersion(pb.CancelModelVersionRequest(name=name))
        thread.join(300)
        assert measured and measured[0] is not None
        ended = version().end_time.ToNanoseconds() / 1e9
        assert len(calibrator.started) == 1 and calibrator.started[0] >= ended
    finally:
        stop_process(worker)
