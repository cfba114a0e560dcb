"""Every RPC of every service fuzzed with requests generated from its descriptor.

A throwaway cluster with API keys on (dataset with its AuthService, trainer, predictor on
vLLM with the tiny model) gets requests drawn by `tests/fuzz_strategies.message` for each
method's input type, through real channels, once with the admin key and once with an app
key of one app. Whatever the request, the answer is a status a client can act on: never
INTERNAL, UNKNOWN or DATA_LOSS, and never UNAVAILABLE while every service is up. After each
method's run every service still answers its health check SERVING and the predictor's
vLLM engine process is the one it started with (it did not die, restarted or not).

Streams are read for a few messages and then cancelled; a client stream sends a few drawn
messages. Requests that create and delete are fuzzed too: the cluster is this module's own,
and each method's run starts by putting back the app, dataset, version and model the
strategies name.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2, text_format
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraforge.auth.v1 import auth_service_pb2 as apb
from loraforge.auth.v1 import auth_service_pb2_grpc as apb_grpc
from loraforge.dataset.v1 import dataset_service_pb2 as dpb
from loraforge.dataset.v1 import dataset_service_pb2_grpc as dpb_grpc
from loraforge.predictor.v1 import predictor_service_pb2 as ppb
from loraforge.predictor.v1 import predictor_service_pb2_grpc as ppb_grpc
from loraforge.trainer.v1 import trainer_service_pb2 as tpb
from loraforge.trainer.v1 import trainer_service_pb2_grpc as tpb_grpc
from tests import fuzz_strategies
from tests.support import ServiceProcess, channel, free_port, start_keyed_services, start_service
from tests.test_auth import HOST, SERVICES, every_method, path_of
from tests.test_predictor_helpers import tiny_base

pytestmark = pytest.mark.slow

APP_ID = "fz"
APP = f"apps/{APP_ID}"
DATASET = f"{APP}/datasets/d1"
DATASET_VERSION = f"{DATASET}/versions/v1"
MODEL = f"{APP}/models/m1"
MODEL_VERSION = f"{MODEL}/versions/v1"
TEMPLATE = "templates/HF_Llama_3_2_1b_instruct_lora"
# What no client may see, whatever it sends.
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}
# Every service of the cluster is up for the whole run: none may say it is not.
NEVER_WHILE_UP = {grpc.StatusCode.UNAVAILABLE}
CALL_SECONDS = 60
STREAM_MESSAGES = 5
STREAM_SECONDS = 5
# Examples per method and key; the predictor's, which reach the engine, get more.
EXAMPLES = 20
PREDICTOR_EXAMPLES = 100
ROWS = b"".join(
    b'{"prompt": "what is %d plus %d?", "completion": " %d"}\n' % (i, i, 2 * i) for i in range(8)
)


@dataclass
class FuzzCluster:
    dataset: ServiceProcess
    trainer: ServiceProcess
    predictor: ServiceProcess
    base: Path
    admin_key: str
    channels: dict[str, grpc.Channel]
    engine_pids: set[int]
    app_key: str = ""
    names: list[str] = field(default_factory=list)
    valid: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    api: ServiceProcess | None = None
    console: ServiceProcess | None = None

    def key(self, kind: str) -> str:
        return self.admin_key if kind == "admin" else self.app_key


def _bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def engine_pids(root: int) -> set[int]:
    """The `VLLM::EngineCore` processes among `root`'s descendants."""
    children: dict[int, list[int]] = {}
    titles: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            titles[int(entry.name)] = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        for child in children.get(pid, []):
            todo.append(child)
            if "EngineCore" in titles.get(child, ""):
                found.add(child)
    return found


def _ok_or(code: grpc.StatusCode, call: Any) -> None:
    try:
        call()
    except grpc.RpcError as err:
        if err.code() != code:
            raise


def ensure_baseline(cluster: FuzzCluster) -> None:
    """Puts back what an earlier run's deletes and revokes took: the app, its dataset with
    rows and a version, its model with a (queued) version, and a key of the app."""
    admin = _bearer(cluster.admin_key)
    dstub = dpb_grpc.DatasetServiceStub(cluster.channels["dataset"])
    tstub = tpb_grpc.TrainerServiceStub(cluster.channels["trainer"])
    exists = grpc.StatusCode.ALREADY_EXISTS
    _ok_or(exists, lambda: dstub.CreateApp(dpb.CreateAppRequest(app_id=APP_ID), metadata=admin))
    _ok_or(
        exists,
        lambda: dstub.CreateDataset(
            dpb.CreateDatasetRequest(parent=APP, dataset_id="d1"), metadata=admin
        ),
    )
    try:
        dstub.GetDatasetVersion(dpb.GetDatasetVersionRequest(name=DATASET_VERSION), metadata=admin)
    except grpc.RpcError:
        header = dpb.UploadHeader(dataset=DATASET, file_name="rows.jsonl")
        dstub.UploadInputs(
            iter([dpb.UploadInputsRequest(header=header), dpb.UploadInputsRequest(chunk=ROWS)]),
            metadata=admin,
        )
        dstub.CreateDatasetVersion(
            dpb.CreateDatasetVersionRequest(parent=DATASET, version_id="v1"), metadata=admin
        )
    _ok_or(
        exists,
        lambda: tstub.CreateModel(
            tpb.CreateModelRequest(parent=APP, model_id="m1"), metadata=admin
        ),
    )
    _ok_or(
        exists,
        lambda: tstub.CreateModelVersion(
            tpb.CreateModelVersionRequest(
                parent=MODEL,
                version_id="v1",
                template=TEMPLATE,
                dataset_version=DATASET_VERSION,
                param_overrides=json_format.ParseDict(
                    {
                        "model_config": {
                            "pretrained_model_name_or_path": f"tests/{cluster.base.name}"
                        }
                    },
                    struct_pb2.Struct(),
                ),
            ),
            metadata=admin,
        ),
    )
    auth = apb_grpc.AuthServiceStub(cluster.channels["dataset"])
    if cluster.app_key:
        try:
            auth.WhoAmI(apb.WhoAmIRequest(), metadata=_bearer(cluster.app_key))
            return
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.UNAUTHENTICATED:
                raise
    cluster.app_key = auth.CreateApiKey(
        apb.CreateApiKeyRequest(app=APP, scopes=["read", "write", "train", "predict"]),
        metadata=admin,
    ).secret


@contextlib.contextmanager
def fuzz_cluster(workdir: Path, http: bool = False) -> Iterator[FuzzCluster]:
    """A cluster with API keys on, its predictor on vLLM with the tiny model, the baseline
    resources in place. With `http`, the OpenAI-compatible API and the console in front of
    it too, and the model has a chat template (without one, chat requests of every kind
    are refused: the RPC fuzzing covers that path)."""
    from tests.test_openai_api import _chat_base

    base = _chat_base(workdir) if http else tiny_base(workdir)
    started: list[ServiceProcess] = []
    try:
        predictor_port = free_port()
        keyed = start_keyed_services(
            workdir,
            base,
            started,
            trainer_args=["--predictor-address", f"127.0.0.1:{predictor_port}"],
            trainer_env={"LORAFORGE_MODEL_ROOTS": f"tests={workdir}"},
            predictor_args=[
                *("--engine", "vllm", "--dtype", "float32", "--port", str(predictor_port)),
            ],
            predictor_timeout=600,
        )
        dataset, trainer, predictor, auth = (
            keyed.dataset,
            keyed.trainer,
            keyed.predictor,
            keyed.auth_env,
        )
        addresses = [
            *("--dataset-address", dataset.address, "--trainer-address", trainer.address),
            *("--predictor-address", predictor.address),
        ]
        api = console = None
        if http:
            api = start_service(
                "loraforge.services.openai_api",
                workdir,
                args=[*addresses, "--models-cache-seconds", "0"],
                env=auth,
            )
            started.append(api)
            console = start_service("loraforge.services.console", workdir, args=addresses, env=auth)
            started.append(console)
        admin_key = keyed.admin_key
        channels = {
            name: channel(svc.address)
            for name, svc in (("dataset", dataset), ("trainer", trainer), ("predictor", predictor))
        }
        result = FuzzCluster(
            dataset,
            trainer,
            predictor,
            base,
            admin_key,
            channels,
            engine_pids(predictor.proc.pid),
            api=api,
            console=console,
        )
        assert result.engine_pids, "the predictor started no VLLM::EngineCore process"
        ensure_baseline(result)
        result.valid = valid_requests(base)
        result.names = [
            APP,
            DATASET,
            DATASET_VERSION,
            MODEL,
            MODEL_VERSION,
            f"{MODEL_VERSION}/checkpoints/checkpoint-1",
            f"{MODEL}/evaluations/e1",
            TEMPLATE,
            str(base),
            f"tests/{base.name}",
            "apps/other",
            "apps/other/models/m1/versions/v1",
            "read",
            "write",
            "train",
            "predict",
            "admin",
            "user",
            "assistant",
            "system",
        ]
        yield result
    finally:
        for service in reversed(started):
            service.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzCluster]:
    with fuzz_cluster(tmp_path_factory.mktemp("fuzz-rpc")) as started:
        yield started


def valid_requests(base: Path) -> dict[str, list[dict[str, Any]]]:
    """Requests each method accepts (or refuses for a reason of state, not of form), by
    method name, as JSON: the strategies start from them and redraw a few fields."""
    tiny = f"tests/{base.name}"
    overrides = {
        "model_config": {"pretrained_model_name_or_path": tiny},
        "peft_config": {"r": 8},
        "tokenizer_config": {"model_max_length": 64, "prompt_format": "chat"},
        "trainer_config": {"max_steps": 4, "learning_rate": 0.01, "seed": 1},
    }
    sampled = {"maxTokens": 6, "temperature": 0.9, "topP": 0.9, "topK": 20, "seed": 7}
    chat = [{"role": "system", "content": "Add."}, {"role": "user", "content": "1 plus 1?"}]
    page = {"pageSize": 2}
    return {
        "CreateApp": [{"appId": "fz-new", "app": {"description": "d"}}],
        "GetApp": [{"name": APP}],
        "UpdateApp": [{"app": {"name": APP, "description": "x"}, "updateMask": "description"}],
        "ListApps": [page],
        "DeleteApp": [{"name": "apps/fz-new", "force": True}],
        "CreateDataset": [{"parent": APP, "datasetId": "d2"}],
        "GetDataset": [{"name": DATASET}],
        "UpdateDataset": [
            {"dataset": {"name": DATASET, "description": "x"}, "updateMask": "description"}
        ],
        "ListDatasets": [{"parent": APP, **page}],
        "DeleteDataset": [{"name": f"{APP}/datasets/d2", "force": True}],
        "UploadInputs": [
            {"header": {"dataset": DATASET, "fileName": "rows.jsonl"}},
            {"chunk": "eyJwcm9tcHQiOiAiYSIsICJjb21wbGV0aW9uIjogImIifQo="},
        ],
        "AddInputs": [{"parent": DATASET, "inputs": [{"raw": "### Human: a ### Assistant: b"}]}],
        "ListInputs": [{"parent": DATASET, **page}],
        "DeleteInputs": [{"parent": DATASET, "names": [f"{DATASET}/inputs/1"]}],
        "CreateDatasetVersion": [{"parent": DATASET, "versionId": "v2"}],
        "GetDatasetVersion": [{"name": DATASET_VERSION}],
        "ListDatasetVersions": [{"parent": DATASET, **page}],
        "DeleteDatasetVersion": [{"name": f"{DATASET}/versions/v2"}],
        "ReadDatasetVersion": [{"name": DATASET_VERSION, "batchSize": 2}],
        "AddDatasetVersionReference": [{"name": DATASET_VERSION, "referrer": MODEL_VERSION}],
        "RemoveDatasetVersionReference": [{"name": DATASET_VERSION, "referrer": MODEL_VERSION}],
        "CreateApiKey": [{"app": APP, "scopes": ["read"], "ttl": "60s"}],
        "ListApiKeys": [{"app": APP, **page}],
        "RevokeApiKey": [{"name": "apiKeys/000000000000"}],
        "VerifyApiKey": [{"key": "lf_000000000000_" + "x" * 43}],
        "WhoAmI": [{}],
        "ListModelTypes": [page],
        "ListTemplates": [page],
        "GetTemplate": [{"name": TEMPLATE}],
        "ListBaseModels": [page],
        "CreateModel": [{"parent": APP, "modelId": "m2"}],
        "GetModel": [{"name": MODEL}],
        "UpdateModel": [
            {"model": {"name": MODEL, "description": "x"}, "updateMask": "description"}
        ],
        "ListModels": [{"parent": APP, **page}],
        "DeleteModel": [{"name": f"{APP}/models/m2", "force": True}],
        "CreateModelVersion": [
            {
                "parent": MODEL,
                "template": TEMPLATE,
                "datasetVersion": DATASET_VERSION,
                "paramOverrides": overrides,
            }
        ],
        "GetModelVersion": [{"name": MODEL_VERSION}],
        "ListModelVersions": [{"parent": MODEL, **page}],
        "DeleteModelVersion": [{"name": f"{MODEL}/versions/v9"}],
        "CancelModelVersion": [{"name": f"{MODEL}/versions/v9"}],
        "WatchModelVersion": [{"name": MODEL_VERSION}],
        "GetModelVersionLogs": [{"name": MODEL_VERSION, **page}],
        "ExportModelVersion": [{"name": MODEL_VERSION}],
        "ListCheckpoints": [{"parent": MODEL_VERSION, **page}],
        "GetCheckpoint": [{"name": f"{MODEL_VERSION}/checkpoints/checkpoint-1"}],
        "EstimateModelVersion": [
            {
                "parent": MODEL,
                "template": TEMPLATE,
                "datasetVersion": DATASET_VERSION,
                "paramOverrides": overrides,
            },
            {
                "parent": MODEL,
                "template": TEMPLATE,
                "datasetVersion": DATASET_VERSION,
                "paramOverrides": {**overrides, "tokenizer_config": {"prompt_format": "raw"}},
            },
        ],
        "CreateEvaluation": [
            {
                "parent": MODEL_VERSION,
                "datasetVersion": DATASET_VERSION,
                "metrics": ["exact_match"],
                "params": {"maxTokens": 4},
                "maxExamples": 2,
            }
        ],
        "GetEvaluation": [{"name": f"{MODEL}/evaluations/e1"}],
        "ListEvaluations": [{"parent": MODEL, **page}],
        "DeleteEvaluation": [{"name": f"{MODEL}/evaluations/e1"}],
        "WatchEvaluation": [{"name": f"{MODEL}/evaluations/e1"}],
        "ListEvaluationResults": [{"parent": f"{MODEL}/evaluations/e1", **page}],
        "CompareEvaluations": [
            {"evaluation": f"{MODEL}/evaluations/e1", "other": f"{MODEL}/evaluations/e2"}
        ],
        "CancelEvaluation": [{"name": f"{MODEL}/evaluations/e1"}],
        "Predict": [
            {"baseModel": True, "inputs": [{"text": "1 plus 1?"}], "params": {"maxTokens": 6}},
            {"baseModel": True, "inputs": [{"text": "a"}, {"text": "b"}], "params": sampled},
            {"baseModel": True, "inputs": [{"messages": chat}], "params": sampled},
            {"model": MODEL, "inputs": [{"text": "1 plus 1?"}], "params": sampled},
        ],
        "PredictStream": [
            {"baseModel": True, "input": {"text": "1 plus 1?"}, "params": {"maxTokens": 6}},
            {"baseModel": True, "input": {"messages": chat}, "params": sampled},
            {"model": MODEL_VERSION, "input": {"text": "x"}, "params": sampled},
        ],
        "LoadAdapter": [{"model": MODEL_VERSION}],
        "UnloadAdapter": [{"model": MODEL_VERSION}],
        "ListAdapters": [page],
        "GetServingInfo": [{}],
    }


def call_once(
    cluster: FuzzCluster, method: MethodDescriptor, requests: list[Message], key: str
) -> grpc.StatusCode:
    """Sends `requests` (one, or several for a client stream) the way any client would,
    reads at most STREAM_MESSAGES of a server stream, and returns the call's status."""
    channel_ = cluster.channels[HOST[_service_label(method)]]
    path = path_of(method)
    response_class = GetMessageClass(method.output_type)
    common: dict[str, Any] = {
        "request_serializer": lambda m: m.SerializeToString(),
        "response_deserializer": response_class.FromString,
    }
    metadata = _bearer(key)
    try:
        if method.client_streaming:
            channel_.stream_unary(path, **common)(
                iter(requests), metadata=metadata, timeout=CALL_SECONDS
            )
        elif method.server_streaming:
            stream = channel_.unary_stream(path, **common)(
                requests[0], metadata=metadata, timeout=CALL_SECONDS
            )
            # A watch of a run that never ends would wait out the deadline: give up sooner.
            timer = threading.Timer(STREAM_SECONDS, stream.cancel)
            timer.start()
            try:
                for count, _ in enumerate(stream, 1):
                    if count >= STREAM_MESSAGES:
                        break
            finally:
                timer.cancel()
                stream.cancel()
        else:
            channel_.unary_unary(path, **common)(
                requests[0], metadata=metadata, timeout=CALL_SECONDS
            )
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def _service_label(method: MethodDescriptor) -> str:
    for label, descriptor in SERVICES.items():
        if descriptor.full_name == method.containing_service.full_name:
            return label
    raise AssertionError(method.full_name)


def assert_still_serving(cluster: FuzzCluster) -> None:
    for name, ch in cluster.channels.items():
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert health.status == health_pb2.HealthCheckResponse.SERVING, name
    info = ppb_grpc.PredictorServiceStub(cluster.channels["predictor"]).GetServingInfo(
        ppb.GetServingInfoRequest(), metadata=_bearer(cluster.admin_key), timeout=30
    )
    assert info.base_models, "the predictor serves no base model"
    now = engine_pids(cluster.predictor.proc.pid)
    assert now == cluster.engine_pids, (
        f"the vLLM engine process died: it was {sorted(cluster.engine_pids)}, now {sorted(now)}"
        f"; the predictor's log: {cluster.predictor.log_path}"
    )


def requests_strategy(
    method: MethodDescriptor, names: list[str], valid: list[dict[str, Any]]
) -> st.SearchStrategy[list[Message]]:
    """The requests of one call of `method`: one, or a few for a client stream (whose
    valid form is the whole list `valid`)."""
    cls = GetMessageClass(method.input_type)
    parsed = [json_format.ParseDict(v, cls()) for v in valid]
    if method.client_streaming:
        one = fuzz_strategies.message(method.input_type, names, parsed)
        as_sent = st.lists(one, min_size=1, max_size=4)
        return st.one_of(as_sent, st.just(parsed), as_sent.map(lambda extra: parsed + extra))
    return fuzz_strategies.message(method.input_type, names, parsed).map(lambda m: [m])


# Requests that once got INTERNAL, in protobuf text (it holds values JSON cannot), sent
# before the drawn ones on every run.
PINNED: dict[str, list[str]] = {
    "CreateApiKey": [
        f'app: "{APP}" scopes: "read" ttl {{ seconds: -9223372036854775808 }}',
        f'app: "{APP}" scopes: "read" ttl {{ seconds: 9223372036854775807 nanos: 2147483647 }}',
    ],
}


def pinned(method: MethodDescriptor) -> list[list[Message]]:
    cls = GetMessageClass(method.input_type)
    return [[text_format.Parse(text, cls())] for text in PINNED.get(method.name, [])]


def _examples(method: MethodDescriptor) -> int:
    return PREDICTOR_EXAMPLES if method.containing_service.name == "PredictorService" else EXAMPLES


@pytest.mark.parametrize("key_kind", ["app", "admin"])
@pytest.mark.parametrize(("service", "method"), every_method(), ids=lambda v: getattr(v, "name", v))
def test_no_request_gets_an_internal_error_or_stops_a_service(
    cluster: FuzzCluster, service: str, method: MethodDescriptor, key_kind: str
) -> None:
    ensure_baseline(cluster)
    key = cluster.key(key_kind)
    seen: dict[grpc.StatusCode, int] = {}

    @settings(
        max_examples=_examples(method),
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(requests_strategy(method, cluster.names, cluster.valid[method.name]))
    def fuzz(requests: list[Message]) -> None:
        code = call_once(cluster, method, requests, key)
        seen[code] = seen.get(code, 0) + 1
        assert code not in NEVER | NEVER_WHILE_UP, (
            f"{path_of(method)} answered {code.name} to {requests!r}; see the logs under "
            f"{cluster.dataset.log_path.parent}"
        )

    for requests in pinned(method):
        code = call_once(cluster, method, requests, key)
        assert code not in NEVER | NEVER_WHILE_UP, f"{path_of(method)}: {code.name} to {requests!r}"
    fuzz()
    print(path_of(method), key_kind, {code.name: n for code, n in sorted(seen.items(), key=str)})
    assert_still_serving(cluster)
