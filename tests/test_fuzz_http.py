"""Every HTTP endpoint of the OpenAI-compatible API and of the console fuzzed with bodies
drawn from their request shapes.

One cluster with API keys on (dataset, trainer, predictor on vLLM with the tiny model,
`loraforge-openai`, `loraforge-console`). Bodies come from `tests/fuzz_strategies`: JSON of
the right and the wrong types, huge numbers, NaN, deep nesting, extra fields, lone
surrogates as `\\ud800` escapes, invalid UTF-8, bodies cut short and wrong content types;
the console gets its own forms' fields with odd values. Whatever is sent, the answer is
never a 5xx and never 429 (nothing here reaches a real limit), the API's errors have
OpenAI's shape, every service still answers its health check, and the vLLM engine process
is the one the predictor started with.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests import fuzz_strategies
from tests.fuzz_strategies import RawBody
from tests.test_fuzz_rpc import (
    APP,
    APP_ID,
    DATASET,
    MODEL,
    MODEL_VERSION,
    FuzzCluster,
    assert_still_serving,
    ensure_baseline,
    fuzz_cluster,
)

pytestmark = pytest.mark.slow

HTTP_SECONDS = httpx.Timeout(60, read=30)
STREAM_BYTES = 4096  # of a streamed answer: enough for a few events
API_EXAMPLES = 150
CONSOLE_EXAMPLES = 20


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzCluster]:
    with fuzz_cluster(tmp_path_factory.mktemp("fuzz-http"), http=True) as started:
        yield started


def _url(service: Any) -> str:
    return f"http://127.0.0.1:{service.port}"


@dataclass
class Answer:
    """What came back: the status and the body read. Status 0: no answer within the read
    timeout (a quiet stream, a busy machine: not a failure); -1: the server dropped the
    connection without answering (the body names the error)."""

    status_code: int
    content: bytes


def send(client: httpx.Client, method: str, path: str, body: RawBody | None) -> Answer:
    """One request; a streamed answer is read for STREAM_BYTES and then dropped, as a
    client that has seen enough would. An event stream that stays quiet (a run's events
    while it waits in the queue) ends the read at the client's read timeout."""
    headers = {"content-type": body.content_type} if body and body.content_type else {}
    content = body.content if body else None
    try:
        with client.stream(method, path, content=content, headers=headers) as response:
            received = b""
            try:
                for chunk in response.iter_bytes():
                    received += chunk
                    if len(received) >= STREAM_BYTES:
                        break
            except httpx.ReadTimeout:
                pass
            return Answer(response.status_code, received)
    except httpx.ReadTimeout:
        return Answer(0, b"")
    except httpx.TransportError as exc:
        return Answer(-1, f"{type(exc).__name__}: {exc}".encode())


def problems_with_api_answer(response: Answer | httpx.Response) -> str:
    """What is wrong with an answer of the OpenAI-compatible API ('' if nothing)."""
    status = response.status_code
    if status < 0:
        return f"no answer: {response.content.decode()}"
    if status >= 500 or status == 429:
        return f"status {status}"
    if status < 400:
        return ""
    try:
        error = json.loads(response.content)["error"]
    except (ValueError, KeyError, TypeError):
        return f"status {status} without OpenAI's error object: {response.content[:300]!r}"
    if not isinstance(error, dict) or not isinstance(error.get("message"), str):
        return f"an error without a message: {error!r}"
    missing = {"message", "type", "param", "code"} - error.keys()
    if missing or not isinstance(error["type"], str):
        return f"an error not in OpenAI's shape (missing {sorted(missing)}): {error!r}"
    return ""


def _log_hint(cluster: FuzzCluster) -> str:
    return f"the services' logs are under {cluster.dataset.log_path.parent}"


def _models(cluster: FuzzCluster) -> list[str]:
    return [str(cluster.base), MODEL, MODEL_VERSION, f"{APP}/models/nothing", ""]


@pytest.fixture(scope="module")
def api(cluster: FuzzCluster) -> Iterator[httpx.Client]:
    assert cluster.api is not None
    with httpx.Client(
        base_url=_url(cluster.api),
        headers={"authorization": f"Bearer {cluster.admin_key}"},
        timeout=HTTP_SECONDS,
    ) as client:
        yield client


@pytest.mark.parametrize("kind", ["chat", "completions"])
def test_no_completion_body_gets_a_5xx_or_a_429_and_errors_have_openais_shape(
    cluster: FuzzCluster, api: httpx.Client, kind: str
) -> None:
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    seen: dict[int, int] = {}

    @settings(
        max_examples=API_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(fuzz_strategies.openai_body(kind, _models(cluster)))
    def fuzz(body: RawBody) -> None:
        response = send(api, "POST", path, body)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        problem = problems_with_api_answer(response)
        assert not problem, f"POST {path} {body!r}: {problem}; {_log_hint(cluster)}"

    fuzz()
    print(path, dict(sorted(seen.items())))
    assert_still_serving(cluster)


def test_no_model_name_or_key_gets_a_5xx_from_the_models_endpoints(
    cluster: FuzzCluster, api: httpx.Client
) -> None:
    names = st.one_of(st.sampled_from(_models(cluster)), fuzz_strategies.odd_strings())
    # None: no header; the others as raw header bytes (latin-1), past what a key can be.
    keys = st.sampled_from(
        [cluster.admin_key, cluster.app_key, None, "lf_x", "x" * 5000, "lf_\xe9\xff", "a b"]
    )

    @settings(
        max_examples=60,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(names, keys)
    @example(str(cluster.base), "lf_\xe9\xff")  # once a 500: a key that cannot be metadata
    def fuzz(name: str, key: str | None) -> None:
        path = "/v1/models/" + urllib.parse.quote(name, safe="/") if name else "/v1/models"
        headers = {b"authorization": b"Bearer " + key.encode("latin-1")} if key else {}
        with httpx.Client(base_url=api.base_url, timeout=HTTP_SECONDS) as client:
            response = client.get(path, headers=headers)
        problem = problems_with_api_answer(response)
        assert not problem, (
            f"GET {path} with key {key and key[:20]!r}: {problem}; {_log_hint(cluster)}"
        )

    fuzz()
    assert_still_serving(cluster)


# ----- the console -------------------------------------------------------------------------

RUN = f"/apps/{APP_ID}/models/m1/versions/v1"
DS = f"/apps/{APP_ID}/datasets/d1"
# Every form post of the console and the fields its handler reads.
CONSOLE_POSTS: dict[str, list[str]] = {
    "/apps": ["app_id", "description"],
    f"/apps/{APP_ID}/datasets": ["dataset_id", "description"],
    f"{DS}/upload": ["file", "skip_duplicates"],
    f"{DS}/versions": ["description"],
    f"/apps/{APP_ID}/train": [
        "template",
        "model",
        "dataset_version",
        "description",
        "model_type",
        "_form",
        "param_overrides.peft_config.r",
        "param_overrides.trainer_config.max_steps",
        "param_overrides.trainer_config.learning_rate",
        "param_overrides.tokenizer_config.prompt_format",
        "param_overrides.model_config.pretrained_model_name_or_path",
    ],
    f"{RUN}/cancel": [],
    f"{RUN}/evaluations": ["dataset_version", "max_examples", "with_base"],
    f"/apps/{APP_ID}/playground/stream": [
        "version",
        "system_prompt",
        "prompt_format",
        "prompt",
        "temperature",
        "max_tokens",
        "top_p",
        "top_k",
        "seed",
    ],
    f"{DS}/delete": ["confirm"],
    f"/apps/{APP_ID}/delete": ["confirm"],
}
# Pages and the query parameters they read.
CONSOLE_GETS: dict[str, list[str]] = {
    "/": [],
    f"/apps/{APP_ID}": ["notice"],
    DS: ["upload", "page"],
    f"/apps/{APP_ID}/train": ["template"],
    f"/apps/{APP_ID}/runs": [],
    RUN: [],
    f"{RUN}/events": ["after"],
    f"{RUN}/evaluations": [],
    f"{RUN}/evaluations/e1": ["vs"],
    f"/apps/{APP_ID}/playground": ["version"],
    "/login": ["next", "why"],
}


@pytest.fixture(scope="module")
def console(cluster: FuzzCluster) -> Iterator[httpx.Client]:
    """A client signed in to the console with the admin key."""
    assert cluster.console is not None
    with httpx.Client(base_url=_url(cluster.console), timeout=HTTP_SECONDS) as client:
        signed_in = client.post("/login", data={"api_key": cluster.admin_key, "next": "/"})
        assert signed_in.status_code == 303, signed_in.text
        yield client


def _console_problem(response: Answer) -> str:
    status = response.status_code
    if status < 0:
        return f"no answer: {response.content.decode()}"
    return f"status {status}" if status >= 500 or status == 429 else ""


@pytest.mark.parametrize("path", list(CONSOLE_POSTS))
def test_no_console_form_gets_a_5xx_or_a_429(
    cluster: FuzzCluster, console: httpx.Client, path: str
) -> None:
    ensure_baseline(cluster)

    @settings(
        max_examples=CONSOLE_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(fuzz_strategies.console_form(CONSOLE_POSTS[path]))
    # Once a 500: a number past int32 in a field the console sends as one.
    @example(RawBody(b"max_examples=35306400862", "application/x-www-form-urlencoded"))
    def fuzz(body: RawBody) -> None:
        response = send(console, "POST", path, body)
        problem = _console_problem(response)
        assert not problem, f"POST {path} {body!r}: {problem}; {_log_hint(cluster)}"

    fuzz()
    assert_still_serving(cluster)


def test_no_sign_in_form_gets_a_5xx_or_a_429(cluster: FuzzCluster) -> None:
    assert cluster.console is not None
    fields = ["api_key", "next"]

    @settings(max_examples=40, deadline=None, database=None)
    @given(fuzz_strategies.console_form(fields), st.sampled_from(["/login", "/logout"]))
    # Once a 500 each: keys that cannot be gRPC metadata.
    @example(RawBody(b"api_key=%1B", "application/x-www-form-urlencoded"), "/login")
    @example(RawBody(b"api_key=%C3%9C", "application/x-www-form-urlencoded"), "/login")
    def fuzz(body: RawBody, path: str) -> None:
        # A fresh client each time: a sign-in or out must not carry over.
        with httpx.Client(base_url=_url(cluster.console), timeout=HTTP_SECONDS) as client:
            response = send(client, "POST", path, body)
        problem = _console_problem(response)
        assert not problem, f"POST {path} {body!r}: {problem}; {_log_hint(cluster)}"

    fuzz()


@pytest.mark.parametrize("path", list(CONSOLE_GETS))
def test_no_console_page_query_or_odd_path_gets_a_5xx_or_a_429(
    cluster: FuzzCluster, console: httpx.Client, path: str
) -> None:
    ensure_baseline(cluster)
    params = st.lists(
        st.tuples(
            st.sampled_from(CONSOLE_GETS[path] or ["x"]),
            fuzz_strategies.odd_strings([DATASET, MODEL_VERSION]),
        ),
        max_size=3,
    )
    # The path's own segments replaced by odd ones (`apps/../x`, control characters...).
    segments = st.one_of(st.none(), fuzz_strategies.odd_strings())

    @settings(
        max_examples=CONSOLE_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(params, segments, st.integers(0, 8))
    def fuzz(query: list[tuple[str, str]], segment: str | None, where: int) -> None:
        target = path
        if segment is not None and path.count("/") > 1:
            parts = path.split("/")
            index = 2 + where % (len(parts) - 2)
            parts[index] = urllib.parse.quote(segment, safe="")
            target = "/".join(parts)
        if query:
            target += "?" + urllib.parse.urlencode(query)
        response = send(console, "GET", target, None)
        problem = _console_problem(response)
        assert not problem, f"GET {target[:500]!r}: {problem}; {_log_hint(cluster)}"

    fuzz()
    assert_still_serving(cluster)
