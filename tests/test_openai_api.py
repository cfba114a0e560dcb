"""The OpenAI-compatible HTTP API through the official `openai` SDK, against real services.

One stack for the module: dataset, trainer and a worker train one LoRA adapter of a
tiny Llama (given a chat template, trained with `prompt_format: chat`); a predictor
(transformers + PEFT, float32) serves it and the base model; `loraforge-openai` sits
in front of the predictor and the trainer. Answers through HTTP are compared with
the predictor's own answers over gRPC for the same input.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from google.protobuf import json_format, struct_pb2

from loraforge.dataset.v1 import dataset_service_pb2 as dpb
from loraforge.dataset.v1 import dataset_service_pb2_grpc as dpb_grpc
from loraforge.predictor.v1 import predictor_service_pb2 as pb
from loraforge.predictor.v1 import predictor_service_pb2_grpc as pb_grpc
from loraforge.trainer.v1 import trainer_service_pb2 as tpb
from loraforge.trainer.v1 import trainer_service_pb2_grpc as tpb_grpc
from tests.support import (
    REPO,
    ServiceProcess,
    channel,
    free_port,
    start_service,
    start_worker,
    stop_process,
)
from tests.test_predictor_helpers import tiny_base

pytestmark = pytest.mark.slow

APP = "apps/shop"
MODEL = f"{APP}/models/adder"
TEMPLATE = "templates/HF_Llama_3_2_1b_instruct_lora"
SYSTEM = "Add the numbers."
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
QUESTION = "what is 3 plus 3?"


@dataclass
class Stack:
    base: str
    version: str
    predictor: pb_grpc.PredictorServiceStub
    predictor_address: str
    trainer_address: str
    dataset_address: str
    api: ServiceProcess
    client: openai.OpenAI

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api.port}/v1"


def _chat_base(root: Path) -> Path:
    """The tiny Llama, with a chat template so chat messages can be rendered."""
    from transformers import AutoTokenizer

    base = tiny_base(root)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(base)
    return base


def _examples(n: int) -> bytes:
    rows = [{"prompt": f"what is {i} plus {i}?", "completion": f" {2 * i}"} for i in range(n)]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _train(tstub: tpb_grpc.TrainerServiceStub, base: Path, dataset_version: str) -> str:
    overrides = json_format.ParseDict(
        {
            "model_config": {"pretrained_model_name_or_path": str(base)},
            "peft_config": {"r": 8},
            "tokenizer_config": {
                "model_max_length": 64,
                "prompt_format": "chat",
                "system_prompt": SYSTEM,
            },
            "trainer_config": {
                "max_steps": 8,
                "logging_steps": 4,
                "save_steps": 100,
                "per_device_train_batch_size": 4,
                "learning_rate": 3e-2,
                "seed": 1,
            },
        },
        struct_pb2.Struct(),
    )
    return tstub.CreateModelVersion(
        tpb.CreateModelVersionRequest(
            parent=MODEL,
            version_id="v1",
            template=TEMPLATE,
            dataset_version=dataset_version,
            param_overrides=overrides,
        )
    ).model_version.name


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Polls `condition` until it holds; fails naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:.0f}s")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("openai-stack")
    base = _chat_base(workdir)
    started: list[ServiceProcess] = []
    worker: subprocess.Popen[bytes] | None = None
    try:
        dataset = start_service("loraforge.services.dataset", workdir)
        started.append(dataset)
        trainer = start_service(
            "loraforge.services.trainer",
            workdir,
            args=["--dataset-address", dataset.address],
            # The operator's setting that lets runs name the tiny model built under `workdir`.
            env={"LORAFORGE_MODEL_ROOTS": f"tests={workdir}"},
        )
        started.append(trainer)
        dstub = dpb_grpc.DatasetServiceStub(channel(dataset.address))
        dstub.CreateApp(dpb.CreateAppRequest(app_id="shop"))
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
        tstub = tpb_grpc.TrainerServiceStub(channel(trainer.address))
        for model in ("adder", "untrained"):
            tstub.CreateModel(tpb.CreateModelRequest(parent=APP, model_id=model))
        version = _train(tstub, base, dataset_version)
        worker = start_worker(
            workdir, dataset.address, env={"LORAFORGE_MODEL_ROOTS": f"tests={workdir}"}
        )
        # The predictor starts while the worker trains.
        predictor = start_service(
            "loraforge.services.predictor",
            workdir,
            args=[
                *("--base-model", str(base), "--trainer-address", trainer.address),
                *("--engine", "transformers", "--dtype", "float32", "--max-lora-rank", "8"),
            ],
            timeout=300,
        )
        started.append(predictor)
        api = start_service(
            "loraforge.services.openai_api",
            workdir,
            args=[
                *("--predictor-address", predictor.address),
                *("--trainer-address", trainer.address, "--dataset-address", dataset.address),
                *("--models-cache-seconds", "0"),
            ],
        )
        started.append(api)

        def trained() -> bool:
            state = tstub.GetModelVersion(tpb.GetModelVersionRequest(name=version))
            assert state.model_version.state != tpb.MODEL_VERSION_STATE_FAILED, (
                state.model_version.failure_reason
            )
            return state.model_version.state == tpb.MODEL_VERSION_STATE_TRAINED

        wait_until(trained, 300, f"training {version}")
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{api.port}/v1", api_key="sk-test", max_retries=0
        )
        yield Stack(
            str(base),
            version,
            pb_grpc.PredictorServiceStub(channel(predictor.address)),
            predictor.address,
            trainer.address,
            dataset.address,
            api,
            client,
        )
    finally:
        stop_process(worker)
        for service in reversed(started):
            service.stop()


def _grpc_chat(stack: Stack, target: dict[str, Any], max_tokens: int) -> pb.PredictOutput:
    response = stack.predictor.Predict(
        pb.PredictRequest(
            inputs=[pb.PredictInput(messages=[pb.ChatMessage(role="user", content=QUESTION)])],
            params=pb.InferenceParams(max_tokens=max_tokens),
            **target,
        ),
        timeout=120,
    )
    return response.outputs[0]


def _grpc_text(
    stack: Stack, target: dict[str, Any], prompt: str, max_tokens: int
) -> pb.PredictOutput:
    response = stack.predictor.Predict(
        pb.PredictRequest(
            inputs=[pb.PredictInput(text=prompt)],
            params=pb.InferenceParams(max_tokens=max_tokens),
            **target,
        ),
        timeout=120,
    )
    return response.outputs[0]


def _served(stack: Stack) -> pb.ServedBaseModel:
    return stack.predictor.GetServingInfo(pb.GetServingInfoRequest(), timeout=10).base_models[0]


def test_models_list_names_the_base_model_and_the_trained_model_and_version(
    stack: Stack,
) -> None:
    listed = {m.id: m for m in stack.client.models.list().data}
    assert next(iter(listed)) == stack.base
    assert {MODEL, stack.version} <= set(listed)
    assert f"{APP}/models/untrained" not in listed, "a model with no trained version cannot serve"
    assert listed[MODEL].owned_by == APP and listed[MODEL].object == "model"
    assert stack.client.models.retrieve(stack.version).id == stack.version
    with pytest.raises(openai.NotFoundError):
        stack.client.models.retrieve(f"{APP}/models/untrained")


def test_chat_completion_of_the_fine_tuned_model_is_the_predictors_answer(stack: Stack) -> None:
    expected = _grpc_chat(stack, {"model": MODEL}, 6)
    for name in (MODEL, stack.version):
        reply = stack.client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": QUESTION}], max_tokens=6
        )
        assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
        assert reply.model == stack.version, "the model version that answered"
        (choice,) = reply.choices
        assert choice.message.role == "assistant" and choice.message.content == expected.text
        assert choice.finish_reason == ("length" if expected.completion_tokens == 6 else "stop")
        assert reply.usage is not None
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (
            expected.prompt_tokens,
            expected.completion_tokens,
        )
        assert reply.usage.total_tokens == expected.prompt_tokens + expected.completion_tokens
    base = stack.client.chat.completions.create(
        model=stack.base,
        messages=[{"role": "user", "content": QUESTION}],
        max_completion_tokens=6,
    )
    assert base.model == stack.base
    assert base.choices[0].message.content == _grpc_chat(stack, {"base_model": True}, 6).text
    assert base.choices[0].message.content != expected.text, "the adapter changes the answer"


def test_streamed_chat_ends_with_usage_and_done(stack: Stack) -> None:
    whole = stack.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], max_tokens=8
    )
    chunks = list(
        stack.client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": QUESTION}],
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and not any(finishes[:-1])
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage is not None
    assert usage.usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]
    assert usage.usage.prompt_tokens == whole.usage.prompt_tokens  # type: ignore[union-attr]
    assert all(c.usage is None for c in chunks[:-1])
    # The raw stream ends with OpenAI's sentinel.
    with httpx.stream(
        "POST",
        f"{stack.url}/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True},
        timeout=60,
    ) as response:
        events = [line for line in response.iter_lines() if line]
    assert response.headers["content-type"].startswith("text/event-stream")
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_text_completions_answer_each_prompt_n_times_streamed_or_not(stack: Stack) -> None:
    prompts = ["Question: what is 1 plus 1? Answer:", "Question: what is 4 plus 4? Answer:"]
    reply = stack.client.completions.create(model=stack.base, prompt=prompts, max_tokens=5, n=2)
    assert reply.object == "text_completion" and reply.model == stack.base
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    expected = [_grpc_text(stack, {"base_model": True}, p, 5) for p in prompts]
    # Greedy (the default temperature): both choices of a prompt are its one answer.
    texts = [e.text for e in expected]
    assert [c.text for c in reply.choices] == [texts[0]] * 2 + [texts[1]] * 2
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 2 * sum(e.completion_tokens for e in expected)
    # A prompt's tokens count once, however many choices answer it.
    assert reply.usage.prompt_tokens == sum(e.prompt_tokens for e in expected)
    streamed: dict[int, str] = {}
    finish: dict[int, str | None] = {}
    for chunk in stack.client.completions.create(
        model=stack.base, prompt=prompts, max_tokens=5, n=2, stream=True
    ):
        assert chunk.object == "text_completion"
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
            finish[c.index] = finish.get(c.index) or c.finish_reason
    assert [streamed[i] for i in range(4)] == [c.text for c in reply.choices]
    assert [finish[i] for i in range(4)] == [c.finish_reason for c in reply.choices]
    adapted = stack.client.completions.create(model=MODEL, prompt=QUESTION, max_tokens=5)
    assert adapted.model == stack.version
    assert adapted.choices[0].text == _grpc_text(stack, {"model": MODEL}, QUESTION, 5).text


def test_sampling_with_a_seed_is_reproducible_and_its_choices_differ(stack: Stack) -> None:
    def sample() -> list[str]:
        reply = stack.client.completions.create(
            model=stack.base, prompt="The", max_tokens=12, n=3, temperature=1.5, seed=7
        )
        return [c.text for c in reply.choices]

    first = sample()
    assert sample() == first
    assert len(set(first)) > 1, first


def _bad_request(call: Callable[[], Any]) -> dict[str, Any]:
    with pytest.raises(openai.BadRequestError) as err:
        call()
    assert err.value.status_code == 400
    body = err.value.body
    assert isinstance(body, dict) and set(body) == {"message", "type", "param", "code"}, body
    assert body["type"] == "invalid_request_error" and body["message"]
    return body


def test_bad_parameters_are_400_in_openais_shape_naming_the_field(stack: Stack) -> None:
    user = [{"role": "user", "content": QUESTION}]
    chat = stack.client.chat.completions.create
    cases: list[tuple[Callable[[], Any], str]] = [
        (lambda: chat(model=MODEL, messages=user, top_p=1.5), "top_p"),
        (lambda: chat(model=MODEL, messages=user, temperature=9), "temperature"),
        (
            lambda: chat(model=MODEL, messages=user, max_completion_tokens=100000),
            "max_completion_tokens",
        ),
        (lambda: chat(model=MODEL, messages=user, max_tokens=0), "max_tokens"),
        (lambda: chat(model=MODEL, messages=user, n=0), "n"),
        (lambda: chat(model=MODEL, messages=user, stop=[""]), "stop"),
        (lambda: chat(model=MODEL, messages=[]), "messages"),
        (
            lambda: chat(model=MODEL, messages=[{"role": "tool", "content": "x"}]),
            "messages[0].role",
        ),  # type: ignore[list-item]
        (
            lambda: chat(model=MODEL, messages=[*user, {"role": "assistant", "content": "6"}]),
            "messages",
        ),
        (
            lambda: stack.client.completions.create(model=MODEL, prompt=["ok", ""]),
            "prompt[1]",
        ),
        (
            lambda: chat(model=MODEL, messages=user, extra_body={"max_tokens": "ten"}),
            "max_tokens",
        ),
        (lambda: chat(model=f"{APP}/models/untrained", messages=user), "model"),
    ]
    for call, param in cases:
        body = _bad_request(call)
        assert body["param"] == param, body
        assert body["message"].startswith(param) or param == "model", body
    # Unknown fields are ignored, as OpenAI ignores them.
    reply = chat(model=MODEL, messages=user, max_tokens=2, extra_body={"not_a_field": 1})
    assert reply.choices[0].message.content is not None
    # A body that is not JSON.
    response = httpx.post(
        f"{stack.url}/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"


def test_an_unknown_model_is_404_model_not_found(stack: Stack) -> None:
    user = [{"role": "user", "content": QUESTION}]
    for name in ("gpt-4o", f"{APP}/models/nope", f"{MODEL}/versions/nope", "apps/x"):
        with pytest.raises(openai.NotFoundError) as err:
            stack.client.chat.completions.create(model=name, messages=user)
        assert isinstance(err.value.body, dict), name
        assert err.value.body["param"] == "model" and err.value.body["code"] == "model_not_found"


def test_a_client_that_disconnects_mid_stream_aborts_the_engine_request(stack: Stack) -> None:
    before = _served(stack).aborted_requests
    # The base model, which writes on until max_tokens (the adapter learned to stop).
    stream = stack.client.chat.completions.create(
        model=stack.base,
        messages=[{"role": "user", "content": "Tell me a long story."}],
        max_tokens=400,
        stream=True,
    )
    received = 0
    for chunk in stream:
        received += bool(chunk.choices and chunk.choices[0].delta.content)
        if received >= 2:
            break
    stream.close()
    wait_until(
        lambda: (
            _served(stack).aborted_requests == before + 1 and _served(stack).running_requests == 0
        ),
        30,
        "the engine request's abort",
    )


def test_a_bad_setting_is_one_line_and_exit_2(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "loraforge.services.openai_api", "--port", "many"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**os.environ, "LORAFORGE_HOME": str(tmp_path)},
    )
    assert done.returncode == 2
    assert done.stdout.strip() == "error: --port: 'many' is not a whole number", done.stdout
    assert "Traceback" not in done.stderr


def test_the_authorization_header_is_accepted_and_sigterm_stops_cleanly(
    stack: Stack, tmp_path: Path
) -> None:
    api = start_service(
        "loraforge.services.openai_api",
        tmp_path,
        args=["--predictor-address", stack.predictor_address],
        name="openai-alone",
    )
    try:
        reply = httpx.post(
            f"http://127.0.0.1:{api.port}/v1/completions",
            json={"model": stack.base, "prompt": "The", "max_tokens": 2},
            headers={"Authorization": "Bearer sk-anything"},
            timeout=60,
        )
        assert reply.status_code == 200, reply.text
        listed = httpx.get(f"http://127.0.0.1:{api.port}/v1/models", timeout=30).json()
        assert [m["id"] for m in listed["data"]] == [stack.base], "no trainer: the base model only"
    finally:
        assert api.stop() == 0


def test_an_unreachable_predictor_is_503_naming_it(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    api = start_service(
        "loraforge.services.openai_api", tmp_path, args=["--predictor-address", address]
    )
    try:
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{api.port}/v1", api_key="sk-test", max_retries=0
        )
        with pytest.raises(openai.InternalServerError) as err:
            client.completions.create(model="anything", prompt="x")
        assert err.value.status_code == 503
        body = err.value.body
        assert isinstance(body, dict) and body["type"] == "server_error", body
        assert address in body["message"] and "not reachable" in body["message"], body
    finally:
        api.stop()


def test_the_models_list_stops_at_its_bound(stack: Stack, tmp_path: Path) -> None:
    api = start_service(
        "loraforge.services.openai_api",
        tmp_path,
        args=[
            *("--predictor-address", stack.predictor_address),
            *("--trainer-address", stack.trainer_address),
            *("--dataset-address", stack.dataset_address),
            *("--max-listed-models", "1"),
        ],
        name="openai-bounded",
    )
    try:
        listed = httpx.get(f"http://127.0.0.1:{api.port}/v1/models", timeout=30).json()["data"]
        assert [m["id"] for m in listed] == [stack.base, MODEL], "the base model, then one"
    finally:
        api.stop()


def test_a_client_that_gives_up_on_a_completion_aborts_the_engine_request(stack: Stack) -> None:
    before = _served(stack).aborted_requests
    body = json.dumps({"model": stack.base, "prompt": "Once upon a time", "max_tokens": 400})
    # A raw connection, closed once the engine runs the request: a client giving up, at
    # whatever point of the generation that happens to be.
    with socket.create_connection(("127.0.0.1", stack.api.port), timeout=30) as conn:
        conn.sendall(
            (
                "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                "Content-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n{body}"
            ).encode()
        )
        wait_until(lambda: _served(stack).running_requests >= 1, 30, "the engine request")
    wait_until(
        lambda: (
            _served(stack).aborted_requests == before + 1 and _served(stack).running_requests == 0
        ),
        30,
        "the engine request's abort",
    )
