"""Hostile requests against a running platform: none stalls the others, and each user's
mistake is answered as one (INVALID_ARGUMENT / HTTP 400 or 413 with what to fix), never as a
rate limit or an internal error.

One cluster with API keys on: dataset, trainer, a predictor serving a tiny Llama
(transformers + PEFT), the OpenAI-compatible API in front of it, and the console.
"""

from __future__ import annotations

import itertools
import json
import socket
import statistics
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from loraforge.auth.v1 import auth_service_pb2 as apb
from loraforge.auth.v1 import auth_service_pb2_grpc as apb_grpc
from loraforge.dataset.v1 import dataset_service_pb2 as dpb
from loraforge.dataset.v1 import dataset_service_pb2_grpc as dpb_grpc
from loraforge.predictor.v1 import predictor_service_pb2 as pb
from loraforge.predictor.v1 import predictor_service_pb2_grpc as pb_grpc
from loraforge.services.common import errors
from loraforge.services.common.errors import MAX_FIELD_VIOLATIONS
from loraforge.services.common.interceptor import to_rpc_status
from loraforge.services.openai_api import convert
from loraforge.trainer.v1 import trainer_service_pb2 as tpb
from loraforge.trainer.v1 import trainer_service_pb2_grpc as tpb_grpc
from tests.support import ServiceProcess, channel, start_keyed_services, start_service
from tests.test_predictor_helpers import tiny_base

pytestmark = pytest.mark.slow

HOSTILE_PROMPT_CHARS = 10 * 1024**2
API_BODY_LIMIT = 1024**2  # the API's max_request_bytes here
CONSOLE_BODY_LIMIT = 64 * 1024  # the console's max_request_bytes here


@dataclass
class Cluster:
    dataset: ServiceProcess
    trainer: ServiceProcess
    predictor: ServiceProcess
    api: ServiceProcess
    console: ServiceProcess
    admin_key: str

    def metadata(self, key: str | None = None) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {key or self.admin_key}")]

    def predictor_stub(self) -> pb_grpc.PredictorServiceStub:
        return pb_grpc.PredictorServiceStub(channel(self.predictor.address))

    def post(self, path: str, body: Any, key: str | None = None) -> httpx.Response:
        return httpx.post(
            f"http://127.0.0.1:{self.api.port}{path}",
            content=body if isinstance(body, bytes) else json.dumps(body).encode(),
            headers={
                "authorization": f"Bearer {key or self.admin_key}",
                "content-type": "application/json",
            },
            timeout=120,
        )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("limits")
    base = tiny_base(workdir)
    started: list[ServiceProcess] = []
    try:
        keyed = start_keyed_services(workdir, base, started)
        dataset, trainer, predictor, auth = (
            keyed.dataset,
            keyed.trainer,
            keyed.predictor,
            keyed.auth_env,
        )
        api = start_service(
            "loraforge.services.openai_api",
            workdir,
            args=[
                *("--predictor-address", predictor.address),
                *("--trainer-address", trainer.address, "--dataset-address", dataset.address),
                *("--models-cache-seconds", "0", "--max-request-bytes", str(API_BODY_LIMIT)),
            ],
        )
        started.append(api)
        console = start_service(
            "loraforge.services.console",
            workdir,
            args=[
                *("--dataset-address", dataset.address, "--trainer-address", trainer.address),
                *("--predictor-address", predictor.address),
                *("--max-request-bytes", str(CONSOLE_BODY_LIMIT)),
            ],
            env=auth,
        )
        started.append(console)
        result = Cluster(dataset, trainer, predictor, api, console, keyed.admin_key)
        stub = dpb_grpc.DatasetServiceStub(channel(dataset.address))
        for app in ("a", "b"):
            stub.CreateApp(dpb.CreateAppRequest(app_id=app), metadata=result.metadata())
        stub.CreateDataset(
            dpb.CreateDatasetRequest(parent="apps/a", dataset_id="d"), metadata=result.metadata()
        )
        yield result
    finally:
        for service in reversed(started):
            service.stop()


def _bad_request(err: grpc.RpcError) -> list[error_details_pb2.BadRequest.FieldViolation]:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, f"{err.code()} came without details: {err.details()}"
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            return list(bad.field_violations)
    raise AssertionError(f"no BadRequest in the details of {err.code()}: {err.details()}")


# --- the event loop ---------------------------------------------------------------------


def test_a_huge_prompt_is_refused_without_stalling_a_running_stream(cluster: Cluster) -> None:
    """A stream keeps its pace while a 10 MB prompt is refused: the prompt's size is checked
    before any of it is rendered or tokenized, and that work is off the event loop."""
    stub = cluster.predictor_stub()
    arrivals: list[float] = []
    ended: list[BaseException] = []

    def stream() -> None:
        try:
            for _ in stub.PredictStream(
                pb.PredictStreamRequest(
                    base_model=True,
                    input=pb.PredictInput(text="The quick brown fox"),
                    params=pb.InferenceParams(max_tokens=400),
                ),
                metadata=cluster.metadata(),
                timeout=600,
            ):
                arrivals.append(time.monotonic())
        except BaseException as exc:
            ended.append(exc)

    reader = threading.Thread(target=stream)
    reader.start()
    deadline = time.monotonic() + 300
    while len(arrivals) < 20 and reader.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(arrivals) >= 20, f"the stream did not get going: {ended}"
    assert reader.is_alive(), "the stream ended before the hostile prompt could be sent"
    sent = time.monotonic()
    with pytest.raises(grpc.RpcError) as refused:
        stub.Predict(
            pb.PredictRequest(
                base_model=True,
                inputs=[pb.PredictInput(text="a" * HOSTILE_PROMPT_CHARS)],
            ),
            metadata=cluster.metadata(),
            timeout=600,
        )
    answered = time.monotonic()
    reader.join(600)
    assert not ended, ended
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    normal = statistics.median(gaps)
    # The slowest gap before the hostile request: what this machine's load alone causes.
    before = max(b - a for a, b in itertools.pairwise(arrivals) if b < sent)
    # The gaps that overlap the hostile request's time at the predictor.
    during = [b - a for a, b in itertools.pairwise(arrivals) if b >= sent and a <= answered]
    assert during, "the stream ended before the hostile prompt was answered"
    assert max(during) <= max(10 * normal, 3 * before, 2.0), (
        f"a stream waited {max(during):.2f}s for a token while a huge prompt was refused "
        f"(median gap {normal:.3f}s, slowest before it {before:.3f}s)"
    )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
    (violation,) = _bad_request(refused.value)
    assert violation.field == "inputs[0].text"
    assert "shorten" in violation.description and f"{HOSTILE_PROMPT_CHARS:,}" in (
        violation.description
    )


def test_a_prompt_over_the_size_bound_names_the_bound_and_what_to_do(cluster: Cluster) -> None:
    stub = cluster.predictor_stub()
    with pytest.raises(grpc.RpcError) as refused:
        next(
            stub.PredictStream(
                pb.PredictStreamRequest(
                    base_model=True,
                    input=pb.PredictInput(
                        messages=[pb.ChatMessage(role="user", content="b" * 1024**2)]
                    ),
                ),
                metadata=cluster.metadata(),
                timeout=120,
            )
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    (violation,) = _bad_request(refused.value)
    assert violation.field == "input.messages"
    assert "more than this predictor takes" in violation.description


# --- error details fit the response headers -----------------------------------------------


def test_a_hundred_thousand_empty_stop_strings_are_invalid_argument_with_details(
    cluster: Cluster,
) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        cluster.predictor_stub().Predict(
            pb.PredictRequest(
                base_model=True,
                inputs=[pb.PredictInput(text="hello")],
                params=pb.InferenceParams(stop=[""] * 100_000),
            ),
            metadata=cluster.metadata(),
            timeout=120,
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
    violations = _bad_request(refused.value)
    assert violations[0].field == "params.stop"
    assert "at most 8 stop strings (got 100000)" in violations[0].description
    assert len(violations) <= MAX_FIELD_VIOLATIONS + 1


def test_a_thousand_empty_inputs_are_invalid_argument_with_the_first_ones_and_a_count(
    cluster: Cluster,
) -> None:
    stub = dpb_grpc.DatasetServiceStub(channel(cluster.dataset.address))
    with pytest.raises(grpc.RpcError) as refused:
        stub.AddInputs(
            dpb.AddInputsRequest(parent="apps/a/datasets/d", inputs=[dpb.NewInput()] * 1000),
            metadata=cluster.metadata(),
            timeout=60,
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
    violations = _bad_request(refused.value)
    assert len(violations) == MAX_FIELD_VIOLATIONS + 1
    assert violations[0].field.startswith("inputs[0].")
    assert violations[-1].field == ""
    assert "more problems like these" in violations[-1].description


def _base_model(cluster: Cluster) -> str:
    reply = httpx.get(
        f"http://127.0.0.1:{cluster.api.port}/v1/models",
        headers={"authorization": f"Bearer {cluster.admin_key}"},
        timeout=60,
    )
    return str(reply.json()["data"][0]["id"])


def test_openai_api_answers_many_bad_stop_strings_400_not_429(cluster: Cluster) -> None:
    reply = cluster.post(
        "/v1/completions",
        {"model": _base_model(cluster), "prompt": "hi", "stop": [""] * 100_000},
    )
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", "stop")
    assert "at most 8 stop strings" in error["message"]
    assert "retry-after" not in reply.headers


# --- request bodies ---------------------------------------------------------------------


def _raw_http(port: int, head: bytes, body_chunks: Iterable[bytes] = ()) -> bytes:
    """Sends `head`, then `body_chunks` while the server reads them; returns what it
    answered once it closes the connection (it must not wait for the whole body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(head)
        try:
            for chunk in body_chunks:
                sock.sendall(chunk)
        except OSError:  # the server answered and closed while the body was still coming
            pass
        answer = b""
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            answer += data
    return answer


def _status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def _json_of(answer: bytes) -> Any:
    return json.loads(answer.split(b"\r\n\r\n", 1)[1])


def test_openai_api_refuses_a_body_over_its_content_length_bound_before_reading_it(
    cluster: Cluster,
) -> None:
    """The request says 10 MB and sends none of it: the 413 comes anyway."""
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
        b"Content-Type: application/json\r\n"
        + f"Content-Length: {HOSTILE_PROMPT_CHARS}\r\n\r\n".encode()
    )
    answer = _raw_http(cluster.api.port, head)
    assert _status_of(answer) == 413
    error = _json_of(answer)["error"]
    assert error["code"] == "request_too_large"
    assert f"{API_BODY_LIMIT:,} bytes" in error["message"]


def test_openai_api_cuts_off_a_chunked_body_once_it_passes_the_bound(cluster: Cluster) -> None:
    sent = 0

    def chunks() -> Iterator[bytes]:
        nonlocal sent
        piece = b"x" * 65536
        while sent < 20 * API_BODY_LIMIT:
            sent += len(piece)
            yield f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
        yield b"0\r\n\r\n"

    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    answer = _raw_http(cluster.api.port, head, chunks())
    assert _status_of(answer) == 413
    assert _json_of(answer)["error"]["code"] == "request_too_large"


def test_openai_api_refuses_a_large_junk_field_with_413(cluster: Cluster) -> None:
    reply = cluster.post(
        "/v1/chat/completions",
        {
            "model": "tiny",
            "messages": [{"role": "user", "content": "hi"}],
            "junk": "j" * (2 * API_BODY_LIMIT),
        },
    )
    assert reply.status_code == 413
    assert reply.json()["error"]["type"] == "invalid_request_error"


def test_openai_api_answers_a_lone_surrogate_400_naming_where(cluster: Cluster) -> None:
    body = b'{"model": "m", "messages": [{"role": "user", "content": "a\\ud800b"}]}'
    reply = cluster.post("/v1/chat/completions", body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["code"] == "invalid_unicode"
    assert error["param"] == "messages[0].content"
    assert "surrogate" in error["message"]
    # In a key, the answer names it escaped.
    reply = cluster.post("/v1/chat/completions", b'{"\\ud800model": "m"}')
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == "\\ud800model"


def test_openai_api_answers_json_nested_a_hundred_thousand_deep_400(cluster: Cluster) -> None:
    depth = 100_000
    body = b'{"model": "m", "prompt": ' + b"[" * depth + b"]" * depth + b"}"
    reply = cluster.post("/v1/completions", body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["code"] == "invalid_json"
    assert "nested too deeply" in error["message"]


# --- model lists --------------------------------------------------------------------------


def _create_key(cluster: Cluster, app: str, scopes: list[str]) -> str:
    stub = apb_grpc.AuthServiceStub(channel(cluster.dataset.address))
    return str(
        stub.CreateApiKey(
            apb.CreateApiKeyRequest(app=app, scopes=scopes), metadata=cluster.metadata()
        ).secret
    )


def test_a_predict_only_key_lists_the_models_it_may_call(cluster: Cluster) -> None:
    key = _create_key(cluster, "apps/a", ["predict"])
    reply = httpx.get(
        f"http://127.0.0.1:{cluster.api.port}/v1/models",
        headers={"authorization": f"Bearer {key}"},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    assert [m["owned_by"] for m in reply.json()["data"]][:1] == ["loraforge"]
    # What the list is built from: its own app only, and that app's models.
    datasets = dpb_grpc.DatasetServiceStub(channel(cluster.dataset.address))
    apps = datasets.ListApps(dpb.ListAppsRequest(), metadata=cluster.metadata(key))
    assert [a.name for a in apps.apps] == ["apps/a"]
    trainer = tpb_grpc.TrainerServiceStub(channel(cluster.trainer.address))
    trainer.ListModels(tpb.ListModelsRequest(parent="apps/a"), metadata=cluster.metadata(key))
    with pytest.raises(grpc.RpcError) as other:
        trainer.ListModels(tpb.ListModelsRequest(parent="apps/b"), metadata=cluster.metadata(key))
    assert other.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "`read` or `predict`" in (other.value.details() or "")


def test_openai_api_answers_a_key_that_is_not_ascii_401(cluster: Cluster) -> None:
    for path in ("/v1/models", f"/v1/models/{_base_model(cluster)}"):
        reply = httpx.get(
            f"http://127.0.0.1:{cluster.api.port}{path}",
            headers={"authorization": "Bearer lf_\u00e9\u00ff".encode("latin-1")},
            timeout=60,
        )
        assert reply.status_code == 401, reply.text
        assert reply.json()["error"]["type"] == "authentication_error"


def test_openai_api_answers_unknown_paths_and_odd_model_names_in_its_own_shape(
    cluster: Cluster,
) -> None:
    reply = httpx.get(f"http://127.0.0.1:{cluster.api.port}/etc/passwd", timeout=60)
    assert reply.status_code == 404
    assert reply.json()["error"]["code"] == "unknown_url"
    reply = httpx.delete(f"http://127.0.0.1:{cluster.api.port}/v1/models", timeout=60)
    assert reply.status_code == 405
    assert reply.json()["error"]["code"] == "method_not_allowed"
    assert "GET" in reply.headers["allow"]
    # A name with a control character is no model: the request's own mistake, not a 500.
    reply = cluster.post("/v1/completions", {"model": "apps/a\n/models/m", "prompt": "hi"})
    assert 400 <= reply.status_code < 500, reply.text
    assert reply.json()["error"]["param"] == "model"


# --- the console --------------------------------------------------------------------------


def test_console_refuses_a_form_body_over_its_bound_before_reading_it(cluster: Cluster) -> None:
    head = (
        b"POST /login HTTP/1.1\r\nHost: localhost\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n"
        + f"Content-Length: {HOSTILE_PROMPT_CHARS}\r\n\r\n".encode()
    )
    answer = _raw_http(cluster.console.port, head)
    assert _status_of(answer) == 413
    assert f"{CONSOLE_BODY_LIMIT:,} bytes" in answer.decode(errors="replace")


def test_console_uploads_keep_their_own_larger_bound(cluster: Cluster) -> None:
    reply = httpx.post(
        f"http://127.0.0.1:{cluster.console.port}/apps/a/datasets/d/upload",
        content=b"x" * (4 * CONSOLE_BODY_LIMIT),
        headers={"x-file-name": "big.txt"},
        timeout=60,
    )
    assert reply.status_code != 413


# --- which refusals are rate limits ---------------------------------------------------------


def _rpc_error(err: errors.LoraforgeError | None, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    """The error a client gets for `err` from a service (None: a refusal of gRPC itself)."""
    if err is None:
        return grpc.aio.AioRpcError(
            code, grpc.aio.Metadata(), grpc.aio.Metadata(), "Sent message larger than max"
        )
    status = to_rpc_status(err)
    return grpc.aio.AioRpcError(
        status.code,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(*status.trailing_metadata),
        status.details,
    )


def test_only_a_limit_that_passes_is_429_with_retry_after() -> None:
    busy = errors.ResourceExhausted(
        "the engine queue is full",
        reason="QUEUE_FULL",
        metadata={errors.RETRY_AFTER_SECONDS: "2.5"},
    )
    error = convert.error_from_rpc(
        _rpc_error(busy, grpc.StatusCode.RESOURCE_EXHAUSTED), None, "the predictor"
    )
    assert (error.status, error.type, error.headers) == (
        429,
        "rate_limit_error",
        {"Retry-After": "3"},
    )
    too_small = errors.ResourceExhausted(
        "adapter is larger than the cache; raise --adapter-cache-bytes",
        reason="ADAPTER_CACHE_TOO_SMALL",
    )
    error = convert.error_from_rpc(
        _rpc_error(too_small, grpc.StatusCode.RESOURCE_EXHAUSTED), None, "the predictor"
    )
    assert (error.status, error.type, error.headers) == (503, "server_error", {})
    assert "--adapter-cache-bytes" in error.message
    error = convert.error_from_rpc(
        _rpc_error(None, grpc.StatusCode.RESOURCE_EXHAUSTED), None, "the predictor"
    )
    assert (error.status, error.type, error.code) == (
        400,
        "invalid_request_error",
        "request_too_large",
    )
