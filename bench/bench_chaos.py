"""Chaos: a whole local cluster under mixed traffic while its engine and a worker are killed.

It starts `LocalCluster` (clients/python/local.py: dataset, trainer, one training worker,
predictor, OpenAI-compatible API, console, API keys on) on the real SmolLM2-135M-Instruct
by default (`--model tiny`: the tiny random Llama of tests/tiny_model.py, for a quick run),
starts a long training run on the worker, and sends traffic from 64 concurrent clients for
`--minutes` (default 2): gRPC Predict and PredictStream and the OpenAI API's completions
and chat completions (streamed and not), each request one of

- valid: greedy, a few tokens;
- seeded: sampled with a `seed` (and temperature, top_p, top_k);
- oversized: a prompt far past the model's context and a huge max_tokens;
- malformed: bad fields (top_p 1.5, empty inputs, unknown models; broken JSON over HTTP).

A third of the way in it kills the predictor's vLLM engine process (`VLLM::EngineCore`,
SIGKILL), and half way in the training worker (SIGKILL; a new worker is started, as a
process manager would). At the end it prints the requests by interface, kind and outcome
(gRPC status or HTTP status), the longest gap between two tokens of a stream, p50/p99
latency, the engine's restarts (new EngineCore processes seen, and the predictor's log),
the training run's state, and, after stopping the cluster, the processes it leaked: any
process started under the cluster (found by the cluster's LORAFORGE_HOME in its
environment) still alive, and any VLLM::EngineCore or multiprocessing resource tracker left.
Traffic goes to 127.0.0.1 only.

    python bench/bench_chaos.py [--minutes 2] [--model real|tiny] [--clients 64] [--workdir DIR]

Exit status 1 if processes leaked.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import re
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("LORAFORGE_AUTH", "on")

import grpc  # noqa: E402
import httpx  # noqa: E402
from google.protobuf import json_format, struct_pb2  # noqa: E402

from loraforge.client.local import LocalCluster  # noqa: E402
from loraforge.dataset.v1 import dataset_service_pb2 as dpb  # noqa: E402
from loraforge.dataset.v1 import dataset_service_pb2_grpc as dpb_grpc  # noqa: E402
from loraforge.predictor.v1 import predictor_service_pb2 as ppb  # noqa: E402
from loraforge.predictor.v1 import predictor_service_pb2_grpc as ppb_grpc  # noqa: E402
from loraforge.services.common.base_models import DEFAULT_BASE_MODEL  # noqa: E402
from loraforge.trainer.v1 import trainer_service_pb2 as tpb  # noqa: E402
from loraforge.trainer.v1 import trainer_service_pb2_grpc as tpb_grpc  # noqa: E402

KINDS = ("valid", "seeded", "oversized", "malformed")
INTERFACES = ("grpc Predict", "grpc PredictStream", "http completions", "http chat")
APP = "apps/chaos"
CALL_SECONDS = 120


# ----- processes -----------------------------------------------------------------------------


def _processes() -> dict[int, tuple[int, str]]:
    """Every process: pid -> (parent pid, command line)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        found[int(entry.name)] = (int(stat.rsplit(")", 1)[1].split()[1]), cmdline.strip())
    return found


def descendants(root: int) -> dict[int, str]:
    """`root`'s descendants: pid -> command line."""
    table = _processes()
    children: dict[int, list[int]] = collections.defaultdict(list)
    for pid, (ppid, _) in table.items():
        children[ppid].append(pid)
    out, todo = {}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out[child] = table[child][1]
            todo.append(child)
    return out


def engine_cores(predictor_pid: int) -> set[int]:
    return {pid for pid, cmd in descendants(predictor_pid).items() if "EngineCore" in cmd}


def leaked(home: Path, seen: dict[int, str]) -> list[str]:
    """This cluster's processes still alive: any started with its LORAFORGE_HOME (every
    service, worker, VLLM::EngineCore and multiprocessing resource tracker inherits it),
    and any process `seen` under the cluster's processes during the run. Other clusters
    on the machine (other homes) are not counted."""
    marker = f"LORAFORGE_HOME={home}".encode()
    table = _processes()
    out = []
    for pid, (_, cmd) in table.items():
        if pid == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            environ = []
        if marker in environ or (pid in seen and seen[pid] == cmd):
            out.append(f"{pid} {cmd[:160]}")
    return out


# ----- the cluster and the training run ------------------------------------------------------


def tiny_model(workdir: Path) -> Path:
    from tests.test_openai_api import _chat_base

    return _chat_base(workdir)


def start_training(cluster: LocalCluster, key: str, tiny: Path | None) -> str:
    """An app, a dataset of sums and a long run on it; returns the run's name."""
    metadata = (("authorization", f"Bearer {key}"),) if key else ()
    dstub = dpb_grpc.DatasetServiceStub(grpc.insecure_channel(cluster.address("dataset")))
    tstub = tpb_grpc.TrainerServiceStub(grpc.insecure_channel(cluster.address("trainer")))
    dstub.CreateApp(dpb.CreateAppRequest(app_id="chaos"), metadata=metadata)
    dstub.CreateDataset(dpb.CreateDatasetRequest(parent=APP, dataset_id="sums"), metadata=metadata)
    rows = "".join(
        json.dumps({"prompt": f"what is {i} plus {i}?", "completion": f" {2 * i}"}) + "\n"
        for i in range(64)
    ).encode()
    header = dpb.UploadHeader(dataset=f"{APP}/datasets/sums", file_name="sums.jsonl")
    dstub.UploadInputs(
        iter([dpb.UploadInputsRequest(header=header), dpb.UploadInputsRequest(chunk=rows)]),
        metadata=metadata,
    )
    version = dstub.CreateDatasetVersion(
        dpb.CreateDatasetVersionRequest(parent=f"{APP}/datasets/sums", version_id="v1"),
        metadata=metadata,
    ).dataset_version.name
    tstub.CreateModel(tpb.CreateModelRequest(parent=APP, model_id="adder"), metadata=metadata)
    overrides: dict[str, Any] = {
        "trainer_config": {"max_steps": 100_000, "logging_steps": 5, "save_steps": 20},
        "tokenizer_config": {"model_max_length": 64},
    }
    template = "templates/HF_SmolLM2_135m_instruct_lora"
    if tiny is not None:
        template = "templates/HF_Llama_3_2_1b_instruct_lora"
        overrides["model_config"] = {"pretrained_model_name_or_path": str(tiny)}
    return tstub.CreateModelVersion(
        tpb.CreateModelVersionRequest(
            parent=f"{APP}/models/adder",
            version_id="v1",
            template=template,
            dataset_version=version,
            param_overrides=json_format.ParseDict(overrides, struct_pb2.Struct()),
        ),
        metadata=metadata,
    ).model_version.name


def run_state(cluster: LocalCluster, key: str, name: str) -> str:
    metadata = (("authorization", f"Bearer {key}"),) if key else ()
    stub = tpb_grpc.TrainerServiceStub(grpc.insecure_channel(cluster.address("trainer")))
    try:
        mv = stub.GetModelVersion(
            tpb.GetModelVersionRequest(name=name), metadata=metadata
        ).model_version
    except grpc.RpcError as err:
        return f"unknown ({err.code().name})"
    return f"{tpb.ModelVersionState.Name(mv.state)} at step {mv.progress.step}"


def cancel_run(cluster: LocalCluster, key: str, name: str) -> None:
    metadata = (("authorization", f"Bearer {key}"),) if key else ()
    stub = tpb_grpc.TrainerServiceStub(grpc.insecure_channel(cluster.address("trainer")))
    try:
        stub.CancelModelVersion(tpb.CancelModelVersionRequest(name=name), metadata=metadata)
    except grpc.RpcError:
        pass


# ----- traffic -------------------------------------------------------------------------------


@dataclass
class Tally:
    outcomes: collections.Counter[tuple[str, str, str]] = field(default_factory=collections.Counter)
    latencies: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    longest_gap: float = 0.0
    longest_gap_at: str = ""

    # Answers to valid and seeded requests by when they ended (seconds into the run): the
    # outage an engine or worker kill causes, and when serving recovered.
    answered: list[tuple[float, bool]] = field(default_factory=list)

    def add(self, interface: str, kind: str, outcome: str, seconds: float, at: float) -> None:
        self.outcomes[(interface, kind, outcome)] += 1
        self.latencies[interface].append(seconds)
        if kind in ("valid", "seeded"):
            self.answered.append((at, outcome in ("OK", "200")))

    def gap(self, seconds: float, where: str) -> None:
        if seconds > self.longest_gap:
            self.longest_gap, self.longest_gap_at = seconds, where


def _params(kind: str, rng: random.Random) -> ppb.InferenceParams:
    if kind == "seeded":
        return ppb.InferenceParams(
            max_tokens=rng.randint(1, 16),
            temperature=rng.choice([0.5, 0.9, 1.3]),
            top_p=rng.choice([0.8, 1.0]),
            top_k=rng.choice([0, 20]),
            seed=rng.choice([0, 1, 42, 2**31 - 1, 2**40, 2**63 - 1]),
        )
    if kind == "oversized":
        return ppb.InferenceParams(max_tokens=2**31 - 1)
    if kind == "malformed":
        return rng.choice(
            [
                ppb.InferenceParams(top_p=1.5),
                ppb.InferenceParams(temperature=-1, max_tokens=0),
                ppb.InferenceParams(stop=["x" * 10_000]),
                ppb.InferenceParams(prompt_format=99),  # type: ignore[arg-type]
            ]
        )
    return ppb.InferenceParams(max_tokens=rng.randint(1, 16))


def _prompt(kind: str, rng: random.Random) -> str:
    if kind == "oversized":
        return "word " * rng.choice([20_000, 200_000])
    if kind == "malformed":
        return rng.choice(["", "\x00" * 10])
    return rng.choice(
        ["what is 3 plus 3?", "Once upon a time", "Hello!", "Summarise: shipping was late."]
    )


async def grpc_call(
    stub: Any,  # PredictorServiceStub over an asyncio channel (the stubs are typed sync)
    stream: bool,
    kind: str,
    rng: random.Random,
    tally: Tally,
    metadata: Any,
) -> str:
    # A malformed request may name a model that does not exist instead of the base model.
    unknown = kind == "malformed" and rng.random() < 0.3
    target: dict[str, Any] = (
        {"model": "apps/chaos/models/nothing"} if unknown else {"base_model": True}
    )
    params = _params(kind, rng)
    prompt = _prompt(kind, rng)
    try:
        if not stream:
            await stub.Predict(
                ppb.PredictRequest(**target, inputs=[ppb.PredictInput(text=prompt)], params=params),
                metadata=metadata,
                timeout=CALL_SECONDS,
            )
            return "OK"
        call = stub.PredictStream(
            ppb.PredictStreamRequest(**target, input=ppb.PredictInput(text=prompt), params=params),
            metadata=metadata,
            timeout=CALL_SECONDS,
        )
        last = None
        async for _ in call:
            now = time.monotonic()
            if last is not None:
                tally.gap(now - last, f"grpc PredictStream ({kind})")
            last = now
        return "OK"
    except grpc.aio.AioRpcError as err:
        return err.code().name


def _http_body(chat: bool, kind: str, rng: random.Random, model: str) -> bytes:
    if kind == "malformed":
        return rng.choice(
            [
                b'{"model": ',
                b'{"model": "\\ud800", "prompt": "x"}',
                json.dumps({"model": model, "top_p": 1.5, "prompt": "x", "messages": "x"}).encode(),
                b"[" * 5000,
                b"\xff\xfe",
            ]
        )
    body: dict[str, Any] = {"model": model, "stream": rng.random() < 0.5}
    if chat:
        body["messages"] = [{"role": "user", "content": _prompt(kind, rng)}]
    else:
        body["prompt"] = _prompt(kind, rng)
    params = _params(kind, rng)
    body["max_tokens"] = params.max_tokens
    if kind == "seeded":
        body.update(seed=params.seed, temperature=params.temperature, top_p=params.top_p)
    return json.dumps(body).encode()


async def http_call(
    client: httpx.AsyncClient, chat: bool, kind: str, rng: random.Random, tally: Tally, model: str
) -> str:
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = _http_body(chat, kind, rng, model)
    try:
        async with client.stream(
            "POST", path, content=body, headers={"content-type": "application/json"}
        ) as response:
            last = None
            async for _ in response.aiter_lines():
                now = time.monotonic()
                if last is not None and response.headers.get("content-type", "").startswith(
                    "text/event-stream"
                ):
                    tally.gap(now - last, f"http {'chat' if chat else 'completions'} ({kind})")
                last = now
            return str(response.status_code)
    except httpx.HTTPError as exc:
        return type(exc).__name__


async def client_loop(
    index: int,
    began: float,
    deadline: float,
    cluster: LocalCluster,
    key: str,
    model: str,
    tally: Tally,
) -> None:
    rng = random.Random(index)
    metadata = (("authorization", f"Bearer {key}"),) if key else ()
    options = [
        ("grpc.max_send_message_length", 64 << 20),
        ("grpc.max_receive_message_length", 64 << 20),
    ]
    async with grpc.aio.insecure_channel(cluster.address("predictor"), options=options) as channel:
        stub = ppb_grpc.PredictorServiceStub(channel)
        headers = {"authorization": f"Bearer {key}"} if key else {}
        base_url = cluster.openai_url.removesuffix("/v1")
        async with httpx.AsyncClient(
            base_url=base_url, headers=headers, timeout=CALL_SECONDS
        ) as client:
            while time.monotonic() < deadline:
                interface = rng.choice(INTERFACES)
                kind = rng.choice(KINDS)
                started = time.monotonic()
                if interface.startswith("grpc"):
                    outcome = await grpc_call(
                        stub, interface.endswith("Stream"), kind, rng, tally, metadata
                    )
                else:
                    outcome = await http_call(
                        client, interface.endswith("chat"), kind, rng, tally, model
                    )
                ended = time.monotonic()
                tally.add(interface, kind, outcome, ended - started, ended - began)


async def traffic(
    cluster: LocalCluster,
    key: str,
    model: str,
    clients: int,
    seconds: float,
    tally: Tally,
    chaos: Any,
) -> None:
    began = time.monotonic()
    deadline = began + seconds
    await asyncio.gather(
        chaos(),
        *(client_loop(i, began, deadline, cluster, key, model, tally) for i in range(clients)),
    )


# ----- the run -------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def restarts_from_log(log: Path) -> list[str]:
    """How long each new engine took to serve, from the predictor's log lines that say
    an engine was replaced (`a new vllm engine serves (started in 50s)`)."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return []
    return re.findall(r"a new \S+ engine serves \(started in ([^)]*)\)", text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=2.0, help="traffic time (default 2)")
    parser.add_argument("--model", choices=["real", "tiny"], default="real")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-chaos-"))
    home = workdir / "home"
    tiny = tiny_model(workdir) if args.model == "tiny" else None
    base_model = str(tiny) if tiny is not None else DEFAULT_BASE_MODEL
    ports = {"dataset": 0, "trainer": 0, "predictor": 0, "openai": 0, "console": 0}
    # The predictor serves with vLLM from the start, as a calibrated machine would: no
    # background measurement starting engines of its own while this one is killed.
    cluster = LocalCluster(
        home=home,
        base_model=base_model,
        ports=ports,
        workers=1,
        extra_env={"LORAFORGE_CALIBRATE_ENGINES": "false"},
    )
    print(f"starting the cluster under {home} on {base_model}", flush=True)
    cluster.start()
    tally = Tally()
    events: list[str] = []
    engines_seen: set[int] = set()
    seen: dict[int, str] = {}
    kill_at: float | None = None

    def note_descendants() -> None:
        for proc in list(cluster.procs.values()):
            seen.update(descendants(proc.pid))

    try:
        key = cluster.api_key()
        run = start_training(cluster, key, tiny)
        predictor_pid = cluster.procs["predictor"].pid
        engines_seen |= engine_cores(predictor_pid)
        note_descendants()
        seconds = args.minutes * 60
        began = time.monotonic()

        async def chaos() -> None:
            await asyncio.sleep(seconds / 3)
            cores = engine_cores(predictor_pid)
            for pid in cores:
                os.kill(pid, signal.SIGKILL)
            nonlocal kill_at
            kill_at = time.monotonic() - began
            events.append(f"{kill_at:5.0f} s: killed the engine {sorted(cores)}")
            await asyncio.sleep(seconds / 2 - seconds / 3)
            worker = cluster.procs["worker-1"]
            events.append(
                f"{time.monotonic() - began:5.0f} s: killed the worker {worker.pid} "
                f"(run {run_state(cluster, key, run)})"
            )
            os.killpg(worker.pid, signal.SIGKILL)
            # A process manager starts another worker; the run's lease expires and it resumes.
            cluster._spawn(
                "worker-2",
                "loraforge.services.trainer.worker",
                ["--dataset-address", cluster.address("dataset")],
                None,
            )
            while time.monotonic() - began < seconds:
                engines_seen.update(engine_cores(predictor_pid))
                note_descendants()
                await asyncio.sleep(1)

        asyncio.run(traffic(cluster, key, base_model, args.clients, seconds, tally, chaos))
        engines_seen.update(engine_cores(predictor_pid))
        note_descendants()
        final_run = run_state(cluster, key, run)
        cancel_run(cluster, key, run)
        info = ""
        try:
            stub = ppb_grpc.PredictorServiceStub(
                grpc.insecure_channel(cluster.address("predictor"))
            )
            served = stub.GetServingInfo(
                ppb.GetServingInfoRequest(),
                metadata=(("authorization", f"Bearer {key}"),),
                timeout=30,
            )
            info = json_format.MessageToJson(served, indent=None)
        except grpc.RpcError as err:
            info = f"GetServingInfo: {err.code().name}"
        predictor_log = cluster.procs["predictor"].log
    finally:
        cluster.stop()
    time.sleep(2)  # what a stop leaves behind has had time to go
    left = leaked(home, seen)
    restarted = restarts_from_log(predictor_log)

    print("\nevents:")
    for line in events:
        print("  " + line)
    total = sum(tally.outcomes.values())
    print(f"\nrequests: {total} from {args.clients} clients in {args.minutes:g} min")
    by_outcome: collections.Counter[str] = collections.Counter()
    for (_, _, outcome), n in tally.outcomes.items():
        by_outcome[outcome] += n
    print("by outcome: " + ", ".join(f"{o} {n}" for o, n in by_outcome.most_common()))
    for interface in INTERFACES:
        for kind in KINDS:
            row = {o: n for (i, k, o), n in tally.outcomes.items() if i == interface and k == kind}
            if row:
                shown = ", ".join(f"{o} {n}" for o, n in sorted(row.items()))
                print(f"  {interface:20} {kind:10} {shown}")
    print("\nlatency (s), every request:")
    for interface in INTERFACES:
        values = tally.latencies.get(interface, [])
        if values:
            print(
                f"  {interface:20} p50 {statistics.median(values):6.2f}  p99 {percentile(values, 0.99):6.2f}"
                f"  ({len(values)})"
            )
    print("\nvalid and seeded requests answered (OK/all) by 10 s of the run:")
    buckets: dict[int, list[int]] = collections.defaultdict(lambda: [0, 0])
    for at, ok in tally.answered:
        buckets[int(at // 10)][0] += ok
        buckets[int(at // 10)][1] += 1
    print("  " + "  ".join(f"{10 * b}s {ok}/{n}" for b, (ok, n) in sorted(buckets.items())))
    if kill_at is not None:
        failed = sorted(at - kill_at for at, ok in tally.answered if not ok and at > kill_at)
        if failed:
            served_after = sum(1 for at, ok in tally.answered if ok and at - kill_at > failed[-1])
            print(
                f"  after the engine kill, valid requests failed from {failed[0]:.1f} s to "
                f"{failed[-1]:.1f} s after it; answered after the last failure: {served_after}"
            )
        else:
            print("  no valid request failed after the engine kill")
    print(
        f"\nlongest gap between two tokens of a stream: {tally.longest_gap:.2f} s ({tally.longest_gap_at})"
    )
    print(
        f"engine processes seen: {len(engines_seen)} (restarts: {max(0, len(engines_seen) - 1)}); "
        f"the predictor's log: {len(restarted)} new engine(s) serving, started in "
        f"{', '.join(restarted) or '-'}"
    )
    print(f"serving info at the end: {info}")
    print(f"training run at the end: {final_run}")
    print(f"\nleaked processes after stopping the cluster: {len(left)}")
    for line in left:
        print("  " + line)
    print(f"logs: {home / 'logs'}")
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
