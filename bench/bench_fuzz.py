"""A longer fuzz run: the strategies of tests/test_fuzz_rpc.py and tests/test_fuzz_http.py,
run for more examples than CI affords, with the answers counted by status.

It starts the same throwaway cluster (API keys on, vLLM with the tiny model, the
OpenAI-compatible API and the console in front) and, round after round until the time
or the examples run out, sends every RPC of every service (with the admin key and an app
key), every completion body and every console form its share of examples. It prints the
answers by status code for each target and in all, and every answer that breaks a
property (INTERNAL, UNKNOWN, DATA_LOSS or UNAVAILABLE over gRPC; a 5xx, a 429 or an
error outside OpenAI's shape over HTTP; an engine that died), with the request that got it.

    python bench/bench_fuzz.py [--examples 20000] [--minutes 10] [--workdir DIR]
        [--only rpc|http]

Exit status 1 if any property broke.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import grpc  # noqa: E402
import httpx  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests import fuzz_strategies  # noqa: E402
from tests.test_auth import every_method, path_of  # noqa: E402
from tests.test_fuzz_http import (  # noqa: E402
    CONSOLE_POSTS,
    HTTP_SECONDS,
    _console_problem,
    _models,
    problems_with_api_answer,
    send,
)
from tests.test_fuzz_rpc import (  # noqa: E402
    NEVER,
    NEVER_WHILE_UP,
    FuzzCluster,
    call_once,
    engine_pids,
    ensure_baseline,
    fuzz_cluster,
    requests_strategy,
)

Outcome = tuple[str, str]  # (status, what broke: '' if nothing)


class Run:
    """Counts by target and status, and the broken answers, within a time budget."""

    def __init__(self, deadline: float, total: int) -> None:
        self.deadline = deadline
        self.left = total
        self.counts: dict[str, collections.Counter[str]] = collections.defaultdict(
            collections.Counter
        )
        self.broken: list[str] = []

    def over(self) -> bool:
        return self.left <= 0 or time.monotonic() > self.deadline

    def fuzz(
        self,
        target: str,
        strategy: st.SearchStrategy[Any],
        examples: int,
        send_one: Callable[[Any], Outcome],
    ) -> None:
        """Up to `examples` draws of `strategy` sent by `send_one`; no shrinking (the
        request that broke a property is printed as it was sent)."""

        @settings(
            max_examples=max(1, examples),
            deadline=None,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(strategy)
        def one(value: Any) -> None:
            if self.over():
                return
            self.left -= 1
            try:
                status, problem = send_one(value)
            except Exception as exc:  # a client-side failure is a finding too, not the end
                status, problem = type(exc).__name__, f"{type(exc).__name__}: {exc}"
            self.counts[target][status] += 1
            if problem:
                self.broken.append(f"{target}: {problem}: {value!r}"[:2000])

        one()


def rpc_round(run: Run, cluster: FuzzCluster, per_target: int) -> None:
    for _, method in every_method():
        strategy = requests_strategy(method, cluster.names, cluster.valid[method.name])
        for kind in ("app", "admin"):
            if run.over():
                return
            ensure_baseline(cluster)
            key = cluster.key(kind)

            def send_one(requests: Any, method: Any = method, key: str = key) -> Outcome:
                code = call_once(cluster, method, requests, key)
                bad = code in NEVER | NEVER_WHILE_UP
                return code.name, (code.name if bad else "")

            run.fuzz(f"{path_of(method)} ({kind} key)", strategy, per_target, send_one)


def http_round(run: Run, cluster: FuzzCluster, per_target: int) -> None:
    assert cluster.api is not None and cluster.console is not None
    api_url = f"http://127.0.0.1:{cluster.api.port}"
    console_url = f"http://127.0.0.1:{cluster.console.port}"
    bearer = {"authorization": f"Bearer {cluster.admin_key}"}
    with httpx.Client(base_url=api_url, headers=bearer, timeout=HTTP_SECONDS) as api:
        for kind, path in (("chat", "/v1/chat/completions"), ("completions", "/v1/completions")):
            if run.over():
                return

            def send_api(body: Any, path: str = path) -> Outcome:
                answer = send(api, "POST", path, body)
                return str(answer.status_code), problems_with_api_answer(answer)

            strategy = fuzz_strategies.openai_body(kind, _models(cluster))
            run.fuzz(f"POST {path}", strategy, per_target * 5, send_api)
    with httpx.Client(base_url=console_url, timeout=HTTP_SECONDS) as console:
        console.post("/login", data={"api_key": cluster.admin_key, "next": "/"})
        for path, fields in CONSOLE_POSTS.items():
            if run.over():
                return
            ensure_baseline(cluster)

            def send_form(body: Any, path: str = path) -> Outcome:
                answer = send(console, "POST", path, body)
                return str(answer.status_code), _console_problem(answer)

            run.fuzz(
                f"console POST {path}", fuzz_strategies.console_form(fields), per_target, send_form
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=20_000, help="examples in all")
    parser.add_argument("--minutes", type=float, default=10, help="time for the fuzzing itself")
    parser.add_argument("--per-target", type=int, default=50, help="examples per target and round")
    parser.add_argument("--only", choices=["rpc", "http"], default=None)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-fuzz-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"starting the cluster under {workdir}", flush=True)
    with fuzz_cluster(workdir, http=args.only != "rpc") as cluster:
        started = time.monotonic()
        run = Run(started + args.minutes * 60, args.examples)
        rounds = 0
        while not run.over():
            if args.only != "http":
                rpc_round(run, cluster, args.per_target)
            if args.only != "rpc":
                http_round(run, cluster, args.per_target)
            rounds += 1
            died = engine_pids(cluster.predictor.proc.pid) != cluster.engine_pids
            if died:
                run.broken.append(f"the vLLM engine process died (logs under {workdir})")
                break
        elapsed = time.monotonic() - started
        health = "SERVING"
        try:
            from tests.test_fuzz_rpc import assert_still_serving

            assert_still_serving(cluster)
        except (AssertionError, grpc.RpcError) as exc:
            health = f"NOT SERVING: {exc}"
            run.broken.append(health)
    sent = sum(sum(c.values()) for c in run.counts.values())
    print(f"\n{sent} requests in {elapsed:.0f} s ({rounds} rounds); after the run: {health}\n")
    for target, counts in sorted(run.counts.items()):
        shown = ", ".join(f"{status} {n}" for status, n in sorted(counts.items()))
        print(f"{target}: {shown}")
    total: collections.Counter[str] = collections.Counter()
    for counts in run.counts.values():
        total.update(counts)
    print("\nin all: " + ", ".join(f"{status} {n}" for status, n in sorted(total.items())))
    print(f"\nbroken properties: {len(run.broken)}")
    for line in run.broken[:50]:
        print("  " + line)
    return 1 if run.broken else 0


if __name__ == "__main__":
    sys.exit(main())
