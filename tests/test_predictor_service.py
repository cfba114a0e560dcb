"""The predictor end to end through real processes and real gRPC.

Dataset server, trainer server and a worker train two adapters of one tiny
Llama (and one of a tiny GPT-Neo); one predictor (vLLM) then serves both
adapters and the base model at once, resolving names through the trainer and
fetching adapters from the shared object store; a second predictor serves the
GPT-Neo adapter through transformers + PEFT.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2, json_format, struct_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from loraforge.dataset.v1 import dataset_service_pb2 as dpb
from loraforge.dataset.v1 import dataset_service_pb2_grpc as dpb_grpc
from loraforge.predictor.v1 import predictor_service_pb2 as pb
from loraforge.predictor.v1 import predictor_service_pb2_grpc as pb_grpc
from loraforge.services.common.objectstore import copy_store_to_tree, open_object_store
from loraforge.trainer.v1 import trainer_service_pb2 as tpb
from loraforge.trainer.v1 import trainer_service_pb2_grpc as tpb_grpc
from tests.support import REPO, ServiceProcess, channel, start_service
from tests.test_predictor_helpers import peft_greedy, tiny_base

pytestmark = pytest.mark.slow

APP = "apps/shop"
LLAMA_TEMPLATE = "templates/HF_Llama_3_2_1b_instruct_lora"
NEO_TEMPLATE = "templates/HF_GPTNeo_125m_lora"
PROMPTS = ["Question: what is 3 plus 3? Answer:", "Question: what is 7 plus 7? Answer:"]


@dataclass
class Stack:
    workdir: Path
    llama: Path
    neo: Path
    dataset: ServiceProcess
    trainer: ServiceProcess
    trainer_stub: tpb_grpc.TrainerServiceStub
    dataset_version: str
    predictor: ServiceProcess | None = None
    stub: pb_grpc.PredictorServiceStub | None = None
    versions: dict[str, str] = field(default_factory=dict)
    worker: subprocess.Popen[bytes] | None = None


def _examples(n: int) -> bytes:
    rows = [
        {"prompt": f"Question: what is {i} plus {i}? Answer:", "completion": f" {2 * i}"}
        for i in range(n)
    ]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _overrides(base: Path, lr: float, seed: int, r: int = 8) -> struct_pb2.Struct:
    return json_format.ParseDict(
        {
            "model_config": {"pretrained_model_name_or_path": str(base)},
            "peft_config": {"r": r},
            "tokenizer_config": {"model_max_length": 64},
            "trainer_config": {
                "max_steps": 12,
                "logging_steps": 4,
                "save_steps": 100,
                "per_device_train_batch_size": 4,
                "learning_rate": lr,
                "seed": seed,
            },
        },
        struct_pb2.Struct(),
    )


def _wait_trained(stack: Stack, name: str, timeout: float = 300) -> tpb.ModelVersion:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        version = stack.trainer_stub.GetModelVersion(
            tpb.GetModelVersionRequest(name=name)
        ).model_version
        if version.state == tpb.MODEL_VERSION_STATE_TRAINED:
            return version
        assert version.state not in (
            tpb.MODEL_VERSION_STATE_FAILED,
            tpb.MODEL_VERSION_STATE_CANCELLED,
        ), version.failure_reason
        time.sleep(0.5)
    raise AssertionError(f"{name} did not train in {timeout}s")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("predictor-stack")
    llama = tiny_base(workdir)
    neo = tiny_base(workdir, "gpt_neo")
    dataset = start_service("loraforge.services.dataset", workdir)
    trainer = start_service(
        "loraforge.services.trainer",
        workdir,
        args=["--dataset-address", dataset.address, "--reap-seconds", "1"],
        # The operator's setting that lets runs name the tiny models built under `workdir`.
        env={"LORAFORGE_MODEL_ROOTS": f"tests={workdir}"},
    )
    try:
        dstub = dpb_grpc.DatasetServiceStub(channel(dataset.address))
        dstub.CreateApp(dpb.CreateAppRequest(app_id="shop"))
        dstub.CreateDataset(dpb.CreateDatasetRequest(parent=APP, dataset_id="qa"))
        header = dpb.UploadHeader(dataset=f"{APP}/datasets/qa", file_name="qa.jsonl")
        dstub.UploadInputs(
            iter(
                [
                    dpb.UploadInputsRequest(header=header),
                    dpb.UploadInputsRequest(chunk=_examples(32)),
                ]
            )
        )
        dv = dstub.CreateDatasetVersion(
            dpb.CreateDatasetVersionRequest(parent=f"{APP}/datasets/qa", version_id="v1")
        )
        tstub = tpb_grpc.TrainerServiceStub(channel(trainer.address))
        s = Stack(workdir, llama, neo, dataset, trainer, tstub, dv.dataset_version.name)
        for model in ("alpha", "beta", "neo", "pending", "empty"):
            tstub.CreateModel(tpb.CreateModelRequest(parent=APP, model_id=model))

        def create(model: str, template: str, overrides: struct_pb2.Struct) -> str:
            return tstub.CreateModelVersion(
                tpb.CreateModelVersionRequest(
                    parent=f"{APP}/models/{model}",
                    version_id="v1",
                    template=template,
                    dataset_version=s.dataset_version,
                    param_overrides=overrides,
                )
            ).model_version.name

        # Cancelled before any worker runs: a version that is never TRAINED.
        s.versions["pending"] = create("pending", LLAMA_TEMPLATE, _overrides(llama, 1e-2, 1))
        tstub.CancelModelVersion(tpb.CancelModelVersionRequest(name=s.versions["pending"]))
        s.versions["alpha"] = create("alpha", LLAMA_TEMPLATE, _overrides(llama, 2e-2, 1))
        s.versions["beta"] = create("beta", LLAMA_TEMPLATE, _overrides(llama, 5e-2, 2, r=16))
        s.versions["neo"] = create("neo", NEO_TEMPLATE, _overrides(neo, 3e-2, 3))
        log = open(workdir / "worker.log", "ab")
        env = {
            **os.environ,
            "LORAFORGE_HOME": str(workdir / "home"),
            "LORAFORGE_DATASET_ADDRESS": dataset.address,
            "LORAFORGE_MODEL_ROOTS": f"tests={workdir}",
        }
        s.worker = subprocess.Popen(
            [sys.executable, "-m", "loraforge.services.trainer.worker", "--poll-seconds", "0.2"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
        )
        # The predictor's engine starts while the worker trains.
        s.predictor = start_service(
            "loraforge.services.predictor",
            workdir,
            args=[
                "--base-model",
                str(llama),
                "--trainer-address",
                trainer.address,
                "--dtype",
                "float32",
                "--max-lora-rank",
                "16",
                "--max-loras",
                "4",
                "--kv-cache-gib",
                "1",
            ],
            timeout=300,
        )
        s.stub = pb_grpc.PredictorServiceStub(channel(s.predictor.address))
        yield s
    finally:
        if s.predictor is not None:
            s.predictor.stop()
        if s.worker is not None and s.worker.poll() is None:
            s.worker.send_signal(signal.SIGTERM)
            try:
                s.worker.wait(30)
            except subprocess.TimeoutExpired:
                s.worker.kill()
        trainer.stop()
        dataset.stop()


def _details(err: grpc.RpcError) -> tuple[dict[str, str], error_details_pb2.ErrorInfo]:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    violations: dict[str, str] = {}
    info = error_details_pb2.ErrorInfo()
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.update({v.field: v.description for v in bad.field_violations})
        elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(info)
    return violations, info


def _predict(stub: Any, **kwargs: Any) -> pb.PredictResponse:
    return stub.Predict(pb.PredictRequest(**kwargs), timeout=120)


def _stream(stub: Any, **kwargs: Any) -> list[pb.PredictStreamResponse]:
    return list(stub.PredictStream(pb.PredictStreamRequest(**kwargs), timeout=120))


def test_serving_info_names_the_engine(stack: Stack) -> None:
    (served,) = stack.stub.GetServingInfo(pb.GetServingInfoRequest()).base_models
    assert served.engine == pb.ENGINE_VLLM and "LlamaForCausalLM" in served.engine_reason
    assert (
        served.base_model == str(stack.llama)
        and served.max_loras == 4
        and served.max_lora_rank == 16
    )
    assert served.max_model_len == 512


def test_base_model_unary_and_stream(stack: Stack) -> None:
    params = pb.InferenceParams(max_tokens=10)
    unary = _predict(
        stack.stub,
        base_model=True,
        inputs=[pb.PredictInput(text=p, id=str(i)) for i, p in enumerate(PROMPTS)],
        params=params,
    )
    assert unary.model_version == "" and [o.id for o in unary.outputs] == ["0", "1"]
    for out in unary.outputs:
        assert (
            out.completion_tokens == 10
            and out.finish_reason == pb.FINISH_REASON_LENGTH
            and out.prompt_tokens > 5
        )
    messages = _stream(
        stack.stub, base_model=True, input=pb.PredictInput(text=PROMPTS[0]), params=params
    )
    assert len(messages) >= 2
    assert "".join(m.delta for m in messages) == unary.outputs[0].text
    assert (
        messages[-1].finish_reason == pb.FINISH_REASON_LENGTH
        and messages[-1].completion_tokens == 10
    )
    assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in messages[:-1])


def test_bad_requests_name_their_fields(stack: Stack) -> None:
    cases = [
        (
            dict(
                base_model=True,
                inputs=[pb.PredictInput(text="x")],
                params=pb.InferenceParams(top_p=1.5, temperature=-1, max_tokens=0),
            ),
            {"params.top_p", "params.temperature", "params.max_tokens"},
        ),
        (dict(base_model=True, inputs=[pb.PredictInput(text="x")] * 129), {"inputs"}),
        (dict(base_model=True, inputs=[pb.PredictInput(text="")]), {"inputs[0].text"}),
        (
            dict(model=f"{APP}/models/alpha", base_model=True, inputs=[pb.PredictInput(text="x")]),
            {"model"},
        ),
        (dict(model="models/alpha", inputs=[pb.PredictInput(text="x")]), {"model"}),
        (dict(inputs=[pb.PredictInput(text="x")]), {"model"}),
        (
            dict(
                base_model=True,
                inputs=[pb.PredictInput(text="x")],
                params=pb.InferenceParams(prompt_template="no slot"),
            ),
            {"params.prompt_template"},
        ),
        (dict(base_model=True, inputs=[pb.PredictInput(text="word " * 600)]), {"inputs[0].text"}),
    ]
    for request, fields in cases:
        with pytest.raises(grpc.RpcError) as err:
            _predict(stack.stub, **request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
        violations, _ = _details(err.value)
        assert set(violations) == fields, (request, violations)
    with pytest.raises(grpc.RpcError) as err:
        _stream(
            stack.stub,
            base_model=True,
            input=pb.PredictInput(text="x"),
            params=pb.InferenceParams(top_k=5000),
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(_details(err.value)[0]) == {"params.top_k"}


def test_unknown_and_untrained_models(stack: Stack) -> None:
    one = [pb.PredictInput(text="x")]
    for name in (f"{APP}/models/nope", f"{APP}/models/alpha/versions/nope", "apps/nope/models/x"):
        with pytest.raises(grpc.RpcError) as err:
            _predict(stack.stub, model=name, inputs=one)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND, name
    with pytest.raises(grpc.RpcError) as err:
        _predict(stack.stub, model=stack.versions["pending"], inputs=one)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    _, info = _details(err.value)
    assert info.reason == "MODEL_VERSION_NOT_TRAINED" and info.metadata["state"] == "CANCELLED"
    assert "CANCELLED" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        _predict(stack.stub, model=f"{APP}/models/pending", inputs=one)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert _details(err.value)[1].metadata["state"] == "CANCELLED"
    with pytest.raises(grpc.RpcError) as err:
        _predict(stack.stub, model=f"{APP}/models/empty", inputs=one)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert _details(err.value)[1].reason == "MODEL_NOT_TRAINED"


def test_cancelled_stream_aborts_the_engine_request(stack: Stack) -> None:
    before = stack.stub.GetServingInfo(pb.GetServingInfoRequest()).base_models[0].aborted_requests
    call = stack.stub.PredictStream(
        pb.PredictStreamRequest(
            base_model=True,
            input=pb.PredictInput(text=PROMPTS[0]),
            params=pb.InferenceParams(max_tokens=450),
        ),
        timeout=120,
    )
    received = 0
    for message in call:
        received += message.completion_tokens > 0
        if received >= 2:
            break
    call.cancel()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        served = stack.stub.GetServingInfo(pb.GetServingInfoRequest()).base_models[0]
        if served.aborted_requests == before + 1 and served.running_requests == 0:
            break
        time.sleep(0.05)
    assert served.aborted_requests == before + 1, (
        "the engine request was aborted, not run to its end"
    )
    assert served.running_requests == 0


def test_two_adapters_and_the_base_model_at_once(stack: Stack) -> None:
    """The end-to-end case: two trained adapters and the base model, concurrently, unary and streaming."""
    alpha = _wait_trained(stack, stack.versions["alpha"])
    beta = _wait_trained(stack, stack.versions["beta"])
    params = pb.InferenceParams(max_tokens=12)
    inputs = [pb.PredictInput(text=p, id=f"p{i}") for i, p in enumerate(PROMPTS)]
    targets = {
        "alpha": dict(model=f"{APP}/models/alpha"),
        "beta": dict(model=beta.name),
        "base": dict(base_model=True),
    }
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        unary = {
            k: pool.submit(_predict, stack.stub, inputs=inputs, params=params, **t)
            for k, t in targets.items()
        }
        streams = {
            k: pool.submit(_stream, stack.stub, input=inputs[0], params=params, **t)
            for k, t in targets.items()
        }
        unary_out = {k: f.result() for k, f in unary.items()}
        stream_out = {k: f.result() for k, f in streams.items()}
    assert unary_out["alpha"].model_version == alpha.name
    assert unary_out["beta"].model_version == beta.name
    assert unary_out["base"].model_version == ""
    texts = {k: [o.text for o in r.outputs] for k, r in unary_out.items()}
    assert texts["alpha"] != texts["beta"] != texts["base"] != texts["alpha"], texts
    for key, messages in stream_out.items():
        assert "".join(m.delta for m in messages) == texts[key][0], key
        assert messages[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
        assert {m.model_version for m in messages} == {unary_out[key].model_version}

    # Each adapter's output is what transformers + PEFT generate with it.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(stack.llama)
    store = open_object_store(str(stack.workdir / "home" / "objects"))
    for key, version in (("alpha", alpha), ("beta", beta)):
        folder = stack.workdir / f"check-{key}"
        copy_store_to_tree(store, version.artifacts.adapter_prefix, folder)
        ids = tokenizer(PROMPTS[1])["input_ids"]
        out = unary_out[key].outputs[1]
        expected = peft_greedy(stack.llama, folder, ids, out.completion_tokens)
        assert out.text == tokenizer.decode(expected, skip_special_tokens=True), key

    listed = stack.stub.ListAdapters(pb.ListAdaptersRequest())
    by_version = {a.model_version: a for a in listed.adapters}
    assert by_version[alpha.name].download_count == 1 and by_version[beta.name].rank == 16
    assert by_version[alpha.name].adapter_id != by_version[beta.name].adapter_id
    assert 0 < listed.cache_bytes_used <= listed.cache_bytes_limit


def test_a_models_default_inference_params_fill_what_a_request_leaves_unset(
    stack: Stack,
) -> None:
    alpha = _wait_trained(stack, stack.versions["alpha"])
    model = f"{APP}/models/alpha"
    defaults = pb.InferenceParams(max_tokens=3, temperature=0.0)
    stack.trainer_stub.UpdateModel(
        tpb.UpdateModelRequest(
            model=tpb.Model(name=model, default_inference_params=defaults),
            update_mask=field_mask_pb2.FieldMask(paths=["default_inference_params"]),
        )
    )
    try:
        inputs = [pb.PredictInput(text=PROMPTS[0])]
        # The predictor remembers a model's settings for a few seconds; wait for the update.
        deadline = time.monotonic() + 30
        while True:
            unset = _predict(stack.stub, model=model, inputs=inputs)
            if unset.outputs[0].completion_tokens == 3 or time.monotonic() > deadline:
                break
        assert unset.outputs[0].completion_tokens == 3
        by_version = _predict(stack.stub, model=alpha.name, inputs=inputs)
        assert by_version.outputs[0].completion_tokens == 3, "a version has its model's defaults"
        stated = _predict(
            stack.stub, model=model, inputs=inputs, params=pb.InferenceParams(max_tokens=5)
        )
        assert stated.outputs[0].completion_tokens == 5, "what the request sets wins"
        base = _predict(
            stack.stub, base_model=True, inputs=inputs, params=pb.InferenceParams(max_tokens=7)
        )
        assert base.outputs[0].completion_tokens == 7
    finally:
        stack.trainer_stub.UpdateModel(
            tpb.UpdateModelRequest(
                model=tpb.Model(name=model),
                update_mask=field_mask_pb2.FieldMask(paths=["default_inference_params"]),
            )
        )


def test_twenty_concurrent_cold_requests_download_once(stack: Stack) -> None:
    alpha = _wait_trained(stack, stack.versions["alpha"])
    listed = {
        a.model_version: a for a in stack.stub.ListAdapters(pb.ListAdaptersRequest()).adapters
    }
    if alpha.name in listed:
        stack.stub.UnloadAdapter(pb.UnloadAdapterRequest(model=alpha.name))
    before = listed[alpha.name].download_count if alpha.name in listed else 0
    request = dict(
        model=alpha.name,
        inputs=[pb.PredictInput(text=PROMPTS[0])],
        params=pb.InferenceParams(max_tokens=4),
    )
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda _: _predict(stack.stub, **request), range(20)))
    assert len({r.outputs[0].text for r in results}) == 1
    after = {
        a.model_version: a for a in stack.stub.ListAdapters(pb.ListAdaptersRequest()).adapters
    }[alpha.name]
    assert after.download_count == before + 1
    assert after.active_requests == 0


def test_load_pin_list_and_unload(stack: Stack) -> None:
    beta = _wait_trained(stack, stack.versions["beta"])
    loaded = stack.stub.LoadAdapter(
        pb.LoadAdapterRequest(model=f"{APP}/models/beta", pin=True)
    ).adapter
    assert (
        loaded.model_version == beta.name
        and loaded.pinned
        and loaded.state == pb.ADAPTER_STATE_LOADED
    )
    assert loaded.base_model == str(stack.llama) and loaded.size_bytes > 0
    page = stack.stub.ListAdapters(pb.ListAdaptersRequest(page_size=1))
    assert len(page.adapters) == 1
    rest = stack.stub.ListAdapters(
        pb.ListAdaptersRequest(page_size=10, page_token=page.next_page_token)
    )
    assert beta.name in {a.model_version for a in [*page.adapters, *rest.adapters]}
    stack.stub.UnloadAdapter(pb.UnloadAdapterRequest(model=beta.name))
    remaining = {
        a.model_version for a in stack.stub.ListAdapters(pb.ListAdaptersRequest()).adapters
    }
    assert beta.name not in remaining
    with pytest.raises(grpc.RpcError) as err:
        stack.stub.UnloadAdapter(pb.UnloadAdapterRequest(model=beta.name))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # It comes back, with the same id, on the next request.
    again = _predict(
        stack.stub,
        model=beta.name,
        inputs=[pb.PredictInput(text="x")],
        params=pb.InferenceParams(max_tokens=2),
    )
    assert again.model_version == beta.name
    relisted = {
        a.model_version: a for a in stack.stub.ListAdapters(pb.ListAdaptersRequest()).adapters
    }
    assert relisted[beta.name].adapter_id == loaded.adapter_id


def test_gpt_neo_is_served_through_transformers(stack: Stack) -> None:
    neo = _wait_trained(stack, stack.versions["neo"])
    predictor = start_service(
        "loraforge.services.predictor",
        stack.workdir,
        name="predictor-neo",
        args=[
            "--base-model",
            str(stack.neo),
            "--trainer-address",
            stack.trainer.address,
            "--dtype",
            "float32",
        ],
        env={"LORAFORGE_ADAPTER_CACHE_DIR": str(stack.workdir / "neo-cache")},
    )
    try:
        stub = pb_grpc.PredictorServiceStub(channel(predictor.address))
        (served,) = stub.GetServingInfo(pb.GetServingInfoRequest()).base_models
        assert served.engine == pb.ENGINE_TRANSFORMERS
        assert (
            "GPTNeoForCausalLM" in served.engine_reason
            and "transformers + PEFT" in served.engine_reason
        )
        params = pb.InferenceParams(max_tokens=8)
        adapted = _predict(
            stub,
            model=f"{APP}/models/neo",
            inputs=[pb.PredictInput(text=PROMPTS[0])],
            params=params,
        )
        base = _predict(
            stub, base_model=True, inputs=[pb.PredictInput(text=PROMPTS[0])], params=params
        )
        assert adapted.model_version == neo.name
        assert adapted.outputs[0].text != base.outputs[0].text
        messages = _stream(
            stub, model=neo.name, input=pb.PredictInput(text=PROMPTS[0]), params=params
        )
        assert "".join(m.delta for m in messages) == adapted.outputs[0].text
        assert messages[-1].completion_tokens == adapted.outputs[0].completion_tokens
        # The Llama predictor refuses the GPT-Neo adapter: wrong base model.
        with pytest.raises(grpc.RpcError) as err:
            _predict(stack.stub, model=neo.name, inputs=[pb.PredictInput(text="x")])
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert _details(err.value)[1].reason == "ADAPTER_BASE_MODEL_MISMATCH"
    finally:
        predictor.stop()
