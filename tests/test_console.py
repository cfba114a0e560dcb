"""The web console in a real browser and through a real HTTP client, against real services.

One cluster for the module: dataset, trainer, a worker and a predictor (transformers +
PEFT on a tiny Llama), with `loraforge-console` in front. The browser test drives the
seed's no-code workflow end to end in Debian's Chromium through Playwright, saving a
screenshot of each step to `LORAFORGE_SCREENSHOTS` (default: a temporary folder;
`docs/screenshots/0*.png` are one such run). The HTTP tests check what a browser is
overkill for: SSE resume by Last-Event-ID, the sign-in cookie, the key kept out of URLs
and sent as gRPC metadata, refusals shown as messages.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import json_format, struct_pb2

from loraforge.dataset.v1 import dataset_service_pb2 as dpb
from loraforge.dataset.v1 import dataset_service_pb2_grpc as dgrpc
from loraforge.trainer.v1 import trainer_service_pb2 as tpb
from loraforge.trainer.v1 import trainer_service_pb2_grpc as tgrpc
from tests.support import (
    REPO,
    ServiceProcess,
    channel,
    free_port,
    start_service,
    start_worker,
    stop_process,
    wait_until,
)
from tests.test_predictor_helpers import tiny_base

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TEMPLATE = "templates/HF_Llama_3_2_1b_instruct_lora"
INSTRUCTION = "### Instruction: Add the numbers."
# The long run is cancelled once the page has re-attached to it; the short one is tried.
LONG_RUN_STEPS = 100_000
SHORT_RUN_STEPS = 100


@dataclass
class Cluster:
    base: Path
    dataset: ServiceProcess
    trainer: ServiceProcess
    predictor: ServiceProcess
    console: ServiceProcess

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.console.port}"

    def trainer_stub(self) -> tgrpc.TrainerServiceStub:
        return tgrpc.TrainerServiceStub(channel(self.trainer.address))

    def dataset_stub(self) -> dgrpc.DatasetServiceStub:
        return dgrpc.DatasetServiceStub(channel(self.dataset.address))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("console-cluster")
    base = tiny_base(workdir)
    started: list[ServiceProcess] = []
    worker: subprocess.Popen[bytes] | None = None
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        dataset = start_service("loraforge.services.dataset", workdir)
        started.append(dataset)
        # The trainer's evaluations call the predictor, which starts after it.
        predictor_port = free_port()
        trainer = start_service(
            "loraforge.services.trainer",
            workdir,
            args=[
                *("--dataset-address", dataset.address, "--watch-poll-seconds", "0.1"),
                *("--predictor-address", f"127.0.0.1:{predictor_port}"),
            ],
            # The operator's setting that lets runs name the tiny model built under `workdir`.
            env={"LORAFORGE_MODEL_ROOTS": f"tests={workdir}"},
        )
        started.append(trainer)
        # The predictor loads its engine while the worker starts.
        predictor_start = pool.submit(
            start_service,
            "loraforge.services.predictor",
            workdir,
            args=[
                *("--base-model", str(base), "--trainer-address", trainer.address),
                *("--engine", "transformers", "--dtype", "float32", "--max-lora-rank", "8"),
                *("--port", str(predictor_port)),
            ],
            timeout=300,
        )
        worker = start_worker(
            workdir, dataset.address, env={"LORAFORGE_MODEL_ROOTS": f"tests={workdir}"}
        )
        predictor = predictor_start.result()
        started.append(predictor)
        console = start_service(
            "loraforge.services.console",
            workdir,
            args=[
                *("--dataset-address", dataset.address, "--trainer-address", trainer.address),
                *("--predictor-address", predictor.address),
            ],
        )
        started.append(console)
        yield Cluster(base, dataset, trainer, predictor, console)
    finally:
        pool.shutdown()
        stop_process(worker)
        for service in reversed(started):
            service.stop()


def _examples_csv(path: Path, good: int) -> tuple[Path, list[int]]:
    """A portal-layout CSV of `good` sums and two bad rows; returns it and the bad rows' lines."""
    lines = ["input.data.text.raw,input.data.concepts[*].id"]
    bad_lines = []
    for i in range(good):
        lines.append(f'"{INSTRUCTION} ### Human: what is {i} plus {i}? ### Assistant: {2 * i}",')
        if i in (3, 9):  # a row with no answer to learn, twice
            lines.append(f'"{INSTRUCTION} ### Human: what is {i} plus one?",')
            bad_lines.append(len(lines))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, bad_lines


def _progress_sequences(cluster: Cluster, version: str, until: int = 0) -> list[int]:
    """The sequences of a run's progress events from the trainer itself: all of a finished
    run's, or those up to `until`."""
    stub = cluster.trainer_stub()
    call = stub.WatchModelVersion(tpb.WatchModelVersionRequest(name=version), timeout=60)
    out = []
    for response in call:
        if response.event.WhichOneof("kind") == "progress":
            out.append(response.event.sequence)
        if until and response.event.sequence >= until:
            call.cancel()
            break
    return out


def _sequences(points: Any) -> list[int]:
    """The event sequences of the run page's progress table, in order."""
    return [int(s) for s in points.evaluate_all("rows => rows.map(r => r.dataset.sequence)")]


def _fill_training_form(page: Any, cluster: Cluster, steps: int) -> None:
    """The training settings of the tiny model, with `steps` steps."""
    for group in ("model_config", "peft_config", "tokenizer_config", "trainer_config"):
        summary = page.locator("summary", has_text=group)
        if summary.locator("xpath=..").get_attribute("open") is None:
            summary.click()
    page.get_by_label("pretrained_model_name_or_path").fill(f"tests/{cluster.base.name}")
    settings = {
        "r": "8",
        "model_max_length": "64",
        "max_steps": str(steps),
        "logging_steps": "5",
        "eval_steps": "50",
        "learning_rate": "0.01",
        "per_device_train_batch_size": "4",
        "save_steps": "100000",
    }
    for label, value in settings.items():
        page.get_by_label(label, exact=True).fill(value)


def _shots() -> Path | None:
    folder = os.environ.get("LORAFORGE_SCREENSHOTS")
    return Path(folder) if folder else None


# ----- pieces without a service -------------------------------------------------------------


def test_form_fields_parse_by_type_and_send_only_what_changed() -> None:
    from loraforge.services.console import forms

    template = tpb.Template(
        parameters=[
            tpb.Parameter(
                path="peft_config.r",
                type=tpb.PARAMETER_TYPE_INT,
                default_value=struct_pb2.Value(number_value=16),
                min=1,
                max=256,
            ),
            tpb.Parameter(
                path="trainer_config.learning_rate",
                type=tpb.PARAMETER_TYPE_FLOAT,
                default_value=struct_pb2.Value(number_value=2e-4),
            ),
            tpb.Parameter(
                path="model_config.trust_remote_code",
                type=tpb.PARAMETER_TYPE_BOOL,
                default_value=struct_pb2.Value(bool_value=False),
            ),
            tpb.Parameter(
                path="peft_config.target_modules",
                type=tpb.PARAMETER_TYPE_STRING_LIST,
                default_value=struct_pb2.Value(
                    list_value=struct_pb2.ListValue(values=[struct_pb2.Value(string_value="q")])
                ),
            ),
        ]
    )
    fields = forms.fields_of(template)
    assert fields[0].dom_id == "p-peft_config-r"
    assert fields[0].text(fields[0].default) == "16" and fields[0].bounds() == "1 to 256"
    assert [g for g, _ in forms.groups(fields)] == ["peft_config", "trainer_config", "model_config"]
    changed, _, errors = forms.overrides(
        fields,
        {
            "peft_config.r": "8",
            "trainer_config.learning_rate": "0.0002",
            "model_config.trust_remote_code": "",
            "peft_config.target_modules": "q, v",
        },
    )
    assert errors == {}
    assert changed == {"peft_config": {"r": 8, "target_modules": ["q", "v"]}}
    _, _, errors = forms.overrides(
        fields, {"peft_config.r": "8.5", "trainer_config.learning_rate": "x"}
    )
    assert errors == {
        "peft_config.r": "'8.5' is not a whole number",
        "trainer_config.learning_rate": "'x' is not a number",
    }
    assert forms.check(fields[0], 0) == "must be at least 1"
    by_field, rest = forms.violations_by_field(
        [("param_overrides.peft_config.r", "must be at least 1"), ("request_id", "too long")]
    )
    assert by_field == {"peft_config.r": "must be at least 1"} and rest == ["request_id: too long"]


def test_resume_points_histograms_and_clocks() -> None:
    from loraforge.services.console.data import histogram
    from loraforge.services.console.events import resume_point, sse
    from loraforge.services.console.web import clock

    assert resume_point("41", "7") == 41 and resume_point(None, "7") == 7
    assert resume_point("junk", None) == 0
    assert sse({"a": 1}, event="end", id=3) == b'id: 3\nevent: end\ndata: {"a":1}\n\n'
    bins = histogram([10, 11, 12, 40])
    assert sum(b["count"] for b in bins) == 4 and bins[0]["low"] == 10 and bins[-1]["high"] >= 40
    assert histogram([5, 5]) == [{"low": 5, "high": 5, "count": 2, "height": 1.0}]
    assert (clock(59), clock(61), clock(3 * 3600 + 62)) == ("0:59", "1:01", "3:01:02")


# ----- the seed workflow in a browser ------------------------------------------------------


def test_seed_workflow_in_a_browser(cluster: Cluster, tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (scripts/setup.sh installs Debian's chromium)")
    expect = sync_api.expect
    shots = _shots() or tmp_path / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    csv_path, bad_lines = _examples_csv(tmp_path / "sums.csv", 40)

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.set_default_timeout(60_000)
        expect.set_options(timeout=60_000)

        def shot(name: str) -> None:
            page.screenshot(path=str(shots / f"{name}.png"), full_page=True)

        # 1. Create an app, then a dataset in it.
        page.goto(cluster.url + "/")
        page.get_by_label("App ID").fill("shop")
        page.get_by_label("Description").fill("sums, in words")
        page.get_by_role("button", name="Create app").click()
        expect(page.get_by_role("heading", name="App shop")).to_be_visible()
        page.get_by_label("Dataset ID").fill("sums")
        page.get_by_role("button", name="Create dataset").click()
        expect(page.get_by_role("heading", name="Dataset sums")).to_be_visible()
        shot("01-app-and-dataset")

        # 2. Upload a CSV with good and bad rows; the report lists the bad ones by line.
        page.get_by_label("File to upload").set_input_files(str(csv_path))
        page.get_by_role("button", name="Upload", exact=True).click()
        report = page.get_by_role("region", name="Upload report")
        expect(report).to_be_visible()
        expect(page.get_by_test_id("accepted")).to_have_text("40")
        expect(page.get_by_test_id("rejected")).to_have_text("2")
        rejected = page.get_by_role("table", name="Rejected rows")
        for line in bad_lines:
            row = rejected.get_by_role("row").filter(
                has=page.get_by_role("cell", name=str(line), exact=True)
            )
            expect(row).to_contain_text("no `### Assistant:`")
        expect(page.get_by_role("table", name="First examples")).to_contain_text(
            "what is 0 plus 0?"
        )
        shot("02-upload-report")

        # The same file dropped on the page again, skipping what the dataset holds already.
        page.wait_for_load_state()
        page.get_by_label("Skip rows already in the dataset").check()
        page.locator("[data-drop]").evaluate(
            """(zone, text) => {
                const data = new DataTransfer();
                data.items.add(new File([text], "again.csv", { type: "text/csv" }));
                zone.dispatchEvent(new DragEvent("drop", { dataTransfer: data, bubbles: true }));
            }""",
            csv_path.read_text(encoding="utf-8"),
        )
        expect(page.get_by_test_id("accepted")).to_have_text("0")
        expect(page.get_by_test_id("duplicates")).to_have_text("40")

        # 3. Freeze a version.
        page.get_by_role("button", name="Create version").click()
        expect(page.get_by_role("status")).to_contain_text("40 examples")
        expect(page.get_by_role("table", name="Dataset versions")).to_contain_text("READY")
        shot("03-version")

        # 4. Pick a template; a bad value is flagged at its field before anything is sent.
        page.get_by_role("link", name="Train", exact=True).click()
        expect(page.get_by_role("heading", name="Train a model")).to_be_visible()
        page.wait_for_load_state()  # the picker's script is in place
        page.get_by_label("Template", exact=True).select_option(TEMPLATE)
        expect(page.get_by_role("heading", name="Llama 3.2 1B Instruct + LoRA")).to_be_visible()
        page.get_by_label("Model ID").fill("adder")
        page.get_by_text("peft_config", exact=True).click()
        rank = page.get_by_label("r", exact=True)
        rank.fill("0")
        expect(rank).to_have_attribute("aria-invalid", "true")
        expect(rank).to_have_accessible_description(re.compile("must be at least 1"))
        page.get_by_role("button", name="Train").click()
        expect(page.get_by_text("1 field needs fixing")).to_be_visible()
        shot("04-field-error")
        rank.fill("8")
        expect(rank).not_to_have_attribute("aria-invalid", "true")
        # A long run to watch (and reload, and cancel), then a short one to try.
        _fill_training_form(page, cluster, steps=LONG_RUN_STEPS)
        page.get_by_role("button", name="Train").click()

        # 5. The run page: the chart fills in live.
        expect(page.get_by_role("heading", name=re.compile(r"^Run adder[/]"))).to_be_visible()
        long_run = "apps/shop/models/adder/versions/" + page.url.rsplit("/", 1)[-1]
        points = page.get_by_role("table", name="Progress points", include_hidden=True).locator(
            "tbody tr"
        )
        loss_chart = page.get_by_role("img", name=re.compile("Loss chart"))
        state = page.get_by_role("status", name="Run state")
        expect(points.nth(2)).to_be_attached(timeout=180_000)
        expect(loss_chart.locator("polyline")).to_have_count(1)
        shot("05-run-live")

        # 6. Reloaded mid-run, the page re-attaches: the history once, then live points.
        seen = points.count()
        page.reload()
        expect(points.nth(seen + 1)).to_be_attached()
        expect(state).to_have_text("TRAINING")
        shown = _sequences(points)
        assert shown == sorted(set(shown)), "no duplicate and no reordered point"
        assert shown == _progress_sequences(cluster, long_run, until=shown[-1]), "and no gap"
        page.get_by_role("button", name="Cancel run").click()
        expect(state).to_have_text("CANCELLED")
        expect(page.get_by_role("status", name="Live updates")).to_have_text("The run has ended.")
        assert _sequences(points) == _progress_sequences(cluster, long_run)
        shot("06-run-cancelled")

        # 7. Train again, briefly: the version the playground tries.
        page.get_by_role("link", name="Train", exact=True).click()
        expect(page.get_by_role("heading", name="Train a model")).to_be_visible()
        page.wait_for_load_state()  # the picker's script is in place
        page.get_by_label("Template", exact=True).select_option(TEMPLATE)
        page.get_by_label("Model ID").fill("adder")
        _fill_training_form(page, cluster, steps=SHORT_RUN_STEPS)
        page.get_by_role("button", name="Train").click()
        expect(page.get_by_role("heading", name=re.compile(r"^Run adder[/]"))).to_be_visible()
        version = "apps/shop/models/adder/versions/" + page.url.rsplit("/", 1)[-1]
        expect(state).to_have_text("TRAINED", timeout=180_000)
        expect(loss_chart.locator("polyline")).to_have_count(2)  # train and eval loss
        assert _sequences(points) == _progress_sequences(cluster, version)
        shot("07-run-trained")

        # 8. The playground streams the base model and the fine-tuned version side by side.
        page.get_by_role("link", name="Try it in the playground").click()
        expect(page.get_by_label("Fine-tuned version")).to_have_value(version)
        page.get_by_label("Prompt", exact=True).fill(
            f"{INSTRUCTION} ### Human: what is 3 plus 3? ### Assistant:"
        )
        page.get_by_label("Max tokens").fill("12")
        page.get_by_role("button", name="Generate").click()
        base = page.get_by_role("region", name="Base model")
        tuned = page.get_by_role("region", name=re.compile("^Fine-tuned"))
        for pane in (base, tuned):
            expect(pane.locator("[data-meta]")).to_contain_text("finished:")
        base_text = base.get_by_role("status").inner_text()
        tuned_text = tuned.get_by_role("status").inner_text()
        assert base_text and tuned_text and base_text != tuned_text, (base_text, tuned_text)
        shot("08-playground")

        # 9. At phone width the run page still reads: nothing wider than the screen.
        page.set_viewport_size({"width": 390, "height": 844})
        page.goto(cluster.url + "/" + version)
        expect(state).to_have_text("TRAINED")
        expect(loss_chart.locator("polyline")).to_have_count(2)
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, f"the page is {width}px wide at a 390px screen"
        shot("09-run-phone")
        browser.close()


# ----- HTTP endpoints with a real HTTP client ---------------------------------------------


@pytest.fixture(scope="module")
def finished_run(cluster: Cluster) -> str:
    """A short run in its own app, trained through the services directly."""
    dstub, tstub = cluster.dataset_stub(), cluster.trainer_stub()
    dstub.CreateApp(dpb.CreateAppRequest(app_id="http"))
    dstub.CreateDataset(dpb.CreateDatasetRequest(parent="apps/http", dataset_id="d"))
    rows = "".join(
        json.dumps({"prompt": f"{i}+{i}=", "completion": str(2 * i)}) + "\n" for i in range(12)
    )
    header = dpb.UploadHeader(dataset="apps/http/datasets/d", file_name="d.jsonl")
    dstub.UploadInputs(
        iter([dpb.UploadInputsRequest(header=header), dpb.UploadInputsRequest(chunk=rows.encode())])
    )
    version = dstub.CreateDatasetVersion(
        dpb.CreateDatasetVersionRequest(parent="apps/http/datasets/d")
    ).dataset_version.name
    tstub.CreateModel(tpb.CreateModelRequest(parent="apps/http", model_id="m"))
    overrides = json_format.ParseDict(
        {
            "model_config": {"pretrained_model_name_or_path": f"tests/{cluster.base.name}"},
            "peft_config": {"r": 8},
            "tokenizer_config": {"model_max_length": 32},
            "trainer_config": {"max_steps": 3, "logging_steps": 1, "save_steps": 100},
        },
        struct_pb2.Struct(),
    )
    name = tstub.CreateModelVersion(
        tpb.CreateModelVersionRequest(
            parent="apps/http/models/m",
            template=TEMPLATE,
            dataset_version=version,
            param_overrides=overrides,
        )
    ).model_version.name

    def ended() -> bool:
        mv = tstub.GetModelVersion(tpb.GetModelVersionRequest(name=name)).model_version
        assert mv.state not in (
            tpb.MODEL_VERSION_STATE_FAILED,
            tpb.MODEL_VERSION_STATE_CANCELLED,
        ), mv.failure_reason
        return mv.state == tpb.MODEL_VERSION_STATE_TRAINED

    assert wait_until(ended, 300), f"{name} did not train"
    return name


def _sse(text: str) -> list[dict[str, Any]]:
    """The events of an SSE body: [{id, event, data}]."""
    out = []
    for block in text.split("\n\n"):
        fields: dict[str, Any] = {}
        for line in block.splitlines():
            key, _, value = line.partition(": ")
            if key in ("id", "event", "data"):
                fields[key] = value
        if "data" in fields:
            fields["data"] = json.loads(fields["data"])
            out.append(fields)
    return out


def test_run_events_resume_after_last_event_id(cluster: Cluster, finished_run: str) -> None:
    url = f"{cluster.url}/{finished_run}/events"
    whole = _sse(httpx.get(url, timeout=60).text)
    assert whole[-1]["event"] == "end" and whole[-1]["data"]["state"] == "TRAINED"
    ids = [int(e["id"]) for e in whole if "id" in e]
    assert ids == list(range(1, len(ids) + 1)), "every event once, numbered by its sequence"
    assert any(e["data"].get("kind") == "progress" for e in whole)
    cut = ids[len(ids) // 2]
    resumed = _sse(httpx.get(url, headers={"Last-Event-ID": str(cut)}, timeout=60).text)
    assert [int(e["id"]) for e in resumed if "id" in e] == ids[cut:], "no gap, no duplicate"
    assert resumed[-1]["event"] == "end"
    query = _sse(httpx.get(url, params={"after": str(ids[-1])}, timeout=60).text)
    assert [e["event"] for e in query] == ["end"]


def test_playground_stream_answers_base_and_tuned_with_the_same_params(
    cluster: Cluster, finished_run: str
) -> None:
    form = {"version": finished_run, "prompt": "2+2=", "max_tokens": "4", "temperature": "0"}
    with httpx.stream(
        "POST", f"{cluster.url}/apps/http/playground/stream", data=form, timeout=120
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _sse(r.read().decode())
    assert events[-1]["event"] == "done"
    sides = {e["data"]["side"] for e in events if "event" not in e}
    assert sides == {"base", "tuned"}
    tuned = [e["data"] for e in events if e["data"].get("side") == "tuned"]
    assert tuned[0]["model_version"] == finished_run
    ends = [e["data"] for e in events if e["data"].get("finish_reason")]
    assert len(ends) == 2 and all(e["completion_tokens"] <= 4 for e in ends)
    bad = httpx.post(
        f"{cluster.url}/apps/http/playground/stream",
        data={**form, "temperature": "hot"},
        timeout=60,
    )
    assert bad.status_code == 400 and "temperature" in bad.json()["fields"]
    refused = _sse(
        httpx.post(
            f"{cluster.url}/apps/http/playground/stream",
            data={**form, "temperature": "-1"},
            timeout=60,
        ).text
    )
    failures = [e["data"] for e in refused if e.get("event") == "failure"]
    assert failures and all("temperature" in f["fields"] for f in failures), refused


def _trained_on(cluster: Cluster, version: str) -> str:
    return (
        cluster.trainer_stub()
        .GetModelVersion(tpb.GetModelVersionRequest(name=version))
        .model_version.dataset_version
    )


def test_a_version_and_the_base_model_are_evaluated_side_by_side(
    cluster: Cluster, finished_run: str
) -> None:
    dstub = cluster.dataset_stub()
    dstub.CreateDataset(dpb.CreateDatasetRequest(parent="apps/http", dataset_id="held"))
    rows = "".join(
        json.dumps({"prompt": f"{i}+{i}=", "completion": str(2 * i)}) + "\n" for i in range(20, 26)
    )
    header = dpb.UploadHeader(dataset="apps/http/datasets/held", file_name="held.jsonl")
    dstub.UploadInputs(
        iter([dpb.UploadInputsRequest(header=header), dpb.UploadInputsRequest(chunk=rows.encode())])
    )
    version = dstub.CreateDatasetVersion(
        dpb.CreateDatasetVersionRequest(parent="apps/http/datasets/held")
    ).dataset_version.name
    with httpx.Client(base_url=cluster.url, timeout=60) as http:
        trained_on = http.post(
            f"/{finished_run}/evaluations",
            data={"dataset_version": _trained_on(cluster, finished_run), "max_examples": "6"},
        )
        assert trained_on.status_code in (400, 409)
        assert (
            'id="eval_dataset_version-error" class="field-error" role="alert">' in trained_on.text
        )
        form = http.get(f"/{finished_run}/evaluations")
        assert form.status_code == 200 and 'name="dataset_version"' in form.text
        bad = http.post(
            f"/{finished_run}/evaluations", data={"dataset_version": version, "max_examples": "x"}
        )
        assert bad.status_code == 400 and 'id="max_examples-error"' in bad.text
        started = http.post(
            f"/{finished_run}/evaluations",
            data={"dataset_version": version, "max_examples": "6", "with_base": "on"},
        )
        assert started.status_code == 303, started.text
        page_url = started.headers["location"]
        assert page_url.startswith(f"/{finished_run}/evaluations/") and "vs=apps" in page_url

        def both_done() -> bool:
            text = http.get(page_url).text
            assert "FAILED" not in text, text
            return text.count(">SUCCEEDED<") == 2

        assert wait_until(both_done, 180), "the evaluations did not end"
        page = http.get(page_url).text
        assert 'aria-label="Changed examples"' in page or 'data-testid="better">' in page
        assert 'aria-label="Results"' in page and 'http-equiv="refresh"' not in page
        listed = http.get(f"/{finished_run}/evaluations").text
        assert listed.count("SUCCEEDED") == 2 and "base model" in listed


def test_server_field_violations_show_at_their_fields(cluster: Cluster, finished_run: str) -> None:
    version = (
        cluster.trainer_stub()
        .GetModelVersion(tpb.GetModelVersionRequest(name=finished_run))
        .model_version.dataset_version
    )
    # Posted without the page's script, so only the trainer checks the bounds.
    reply = httpx.post(
        f"{cluster.url}/apps/http/train",
        data={
            "template": TEMPLATE,
            "model": "m",
            "dataset_version": version,
            "peft_config.r": "0",
            "trainer_config.learning_rate": "5",
        },
        timeout=60,
    )
    assert reply.status_code == 400
    html = reply.text
    for dom_id in ("p-peft_config-r", "p-trainer_config-learning_rate"):
        error = re.search(rf'id="{dom_id}-error"[^>]*>([^<]*)<', html)
        assert error and error.group(1).strip(), f"no error at {dom_id}"
        assert re.search(rf'id="{dom_id}"[^>]*aria-invalid="true"', html, re.S) or re.search(
            rf'aria-invalid="true"[^>]*id="{dom_id}"', html, re.S
        )


def test_unknown_pages_and_refusals_are_messages(cluster: Cluster) -> None:
    missing = httpx.get(f"{cluster.url}/apps/nope", timeout=30)
    assert missing.status_code == 404 and 'role="alert"' in missing.text
    assert "nope" in missing.text
    dup = httpx.post(f"{cluster.url}/apps", data={"app_id": "Bad Id!"}, timeout=30)
    assert dup.status_code == 400 and 'id="app_id-error"' in dup.text
    cross = httpx.post(
        f"{cluster.url}/apps", data={"app_id": "x"}, headers={"Origin": "http://evil.test"}
    )
    assert cross.status_code == 403
    assert httpx.get(f"{cluster.url}/static/console.js", timeout=30).status_code == 200


def test_upload_without_the_script_pages_its_rejected_rows_then_deletes(cluster: Cluster) -> None:
    good = [json.dumps({"prompt": f"{i}+1=", "completion": str(i + 1)}) for i in range(3)]
    bad = ['{"prompt": "cut off'] * 120
    body = ("\n".join(good + bad) + "\n").encode()
    with httpx.Client(base_url=cluster.url, timeout=60) as http:
        assert http.post("/apps", data={"app_id": "plain"}).status_code == 303
        assert http.post("/apps/plain/datasets", data={"dataset_id": "d"}).status_code == 303
        sent = http.post(
            "/apps/plain/datasets/d/upload", files={"file": ("rows.jsonl", body, "text/plain")}
        )
        assert sent.status_code == 303, sent.text
        report = http.get(sent.headers["location"])
        assert 'data-testid="accepted">3<' in report.text
        assert 'data-testid="rejected">120<' in report.text
        assert "Page 1 of 3" in report.text
        assert report.text.count("<tr><td>") == 50 + 3  # a page of rejected rows, 3 examples
        upload = sent.headers["location"].split("upload=")[1].split("#")[0]
        last = http.get("/apps/plain/datasets/d", params={"upload": upload, "page": "3"})
        assert "Page 3 of 3" in last.text and "<tr><td>123</td>" in last.text

        confirm = http.get("/apps/plain/datasets/d/delete")
        assert confirm.status_code == 200 and ">Delete dataset</button>" in confirm.text
        deleted = http.post("/apps/plain/datasets/d/delete")
        assert deleted.status_code == 303 and deleted.headers["location"].startswith("/apps/plain")
        assert http.get("/apps/plain/datasets/d").status_code == 404
        assert http.post("/apps/plain/delete").status_code == 303
        assert http.get("/apps/plain").status_code == 404


def test_plain_http_off_loopback_is_refused() -> None:
    """Users' API keys would cross the network readable: HTTPS, or `--insecure` behind a proxy."""
    addresses = [
        "--dataset-address",
        "x:1",
        "--trainer-address",
        "x:1",
        "--predictor-address",
        "x:1",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "loraforge.services.console", "--host", "0.0.0.0", *addresses],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert done.returncode == 2 and "refusing to serve plain HTTP" in done.stdout


# ----- a dropped watch, against a fake trainer --------------------------------------------


class _BreakingTrainer(tgrpc.TrainerServiceServicer):
    """A run whose first watch breaks off after 3 events (as when the trainer restarts);
    a watch that resumes gets the rest, the last one TRAINED. Records every `after_sequence`."""

    NAME = "apps/a/models/m/versions/v"

    def __init__(self) -> None:
        self.afters: list[int] = []
        self.done = threading.Event()

    def GetModelVersion(self, request: tpb.GetModelVersionRequest, context: Any) -> Any:
        state = (
            tpb.MODEL_VERSION_STATE_TRAINED
            if self.done.is_set()
            else (tpb.MODEL_VERSION_STATE_TRAINING)
        )
        return tpb.GetModelVersionResponse(
            model_version=tpb.ModelVersion(name=self.NAME, state=state, template=TEMPLATE)
        )

    def WatchModelVersion(self, request: tpb.WatchModelVersionRequest, context: Any) -> Any:
        self.afters.append(request.after_sequence)
        last = 3 if request.after_sequence == 0 else 6
        for sequence in range(request.after_sequence + 1, last + 1):
            event = tpb.TrainingEvent(sequence=sequence)
            if sequence == 6:
                self.done.set()
                event.state_change.state = tpb.MODEL_VERSION_STATE_TRAINED
            else:
                event.progress.CopyFrom(
                    tpb.TrainingProgress(step=sequence, total_steps=5, train_loss=1.0 / sequence)
                )
            yield tpb.WatchModelVersionResponse(event=event)
        if last == 3:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the trainer is restarting")


def test_a_dropped_watch_resumes_in_the_browser_without_gap_or_duplicate(tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (scripts/setup.sh installs Debian's chromium)")
    fake = _BreakingTrainer()
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(4))
    tgrpc.add_TrainerServiceServicer_to_server(fake, server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    console = start_service(
        "loraforge.services.console",
        tmp_path,
        args=[
            *("--dataset-address", address, "--trainer-address", address),
            *("--predictor-address", address),
        ],
    )
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
            )
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{console.port}/{fake.NAME}")
            state = page.get_by_role("status", name="Run state")
            sync_api.expect(state).to_have_text("TRAINED", timeout=30_000)
            points = page.get_by_role("table", name="Progress points", include_hidden=True)
            assert _sequences(points.locator("tbody tr")) == [1, 2, 3, 4, 5]
            browser.close()
        assert fake.afters == [0, 3], "resumed right after the last event it had"
    finally:
        console.stop()
        server.stop(0)


# ----- sign-in, against a fake dataset service that records what it is sent ----------------


class _RecordingDatasets(dgrpc.DatasetServiceServicer):
    """Answers ListApps by key: `lf_good` sees one app, `lf_narrow` may not list, others are
    unknown. Records every call's authorization metadata."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.lock = threading.Lock()

    def ListApps(self, request: dpb.ListAppsRequest, context: grpc.ServicerContext) -> Any:
        auth = dict(context.invocation_metadata()).get("authorization", "")
        with self.lock:
            self.seen.append(str(auth))
        if auth == "Bearer lf_good":
            return dpb.ListAppsResponse(apps=[dpb.App(name="apps/visible")])
        if auth == "Bearer lf_narrow":
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "this key may not list apps")
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown API key")


@pytest.fixture
def auth_console(tmp_path: Path) -> Iterator[tuple[str, _RecordingDatasets]]:
    fake = _RecordingDatasets()
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(4))
    dgrpc.add_DatasetServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    address = f"127.0.0.1:{port}"
    console = start_service(
        "loraforge.services.console",
        tmp_path,
        args=[
            *("--dataset-address", address, "--trainer-address", address),
            *("--predictor-address", address),
        ],
        env={"LORAFORGE_AUTH": "on"},
    )
    try:
        yield f"http://127.0.0.1:{console.port}", fake
    finally:
        console.stop()
        server.stop(0)


def test_sign_in_keeps_the_key_server_side(auth_console: tuple[str, _RecordingDatasets]) -> None:
    url, fake = auth_console
    with httpx.Client(base_url=url, timeout=30) as http:
        first = http.get("/apps/visible/runs")
        before = http.cookies["loraforge_session"]
        assert first.status_code == 303
        assert first.headers["location"] == "/login?next=%2Fapps%2Fvisible%2Fruns"
        login = http.get(first.headers["location"])
        assert 'type="password"' in login.text and 'method="post"' in login.text

        refused = http.post("/login", data={"api_key": "lf_wrong", "next": "/"})
        assert refused.status_code == 401 and "refused this key" in refused.text
        assert "lf_wrong" not in refused.text

        signed = http.post("/login", data={"api_key": "lf_good", "next": "/"})
        assert signed.status_code == 303 and signed.headers["location"] == "/"
        cookie = signed.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
        assert "lf_good" not in cookie and "lf_good" not in signed.headers["location"]
        assert http.cookies["loraforge_session"] != before, "a fresh session id on sign-in"
        home = http.get("/")
        assert home.status_code == 200 and "visible" in home.text and "lf_good" not in home.text
        assert fake.seen[-1] == "Bearer lf_good", "the key travels as gRPC metadata"

        out = http.post("/logout")
        assert out.status_code == 303
        assert http.get("/").status_code == 303, "signed out, the key is gone"

        narrow = http.post("/login", data={"api_key": "lf_narrow", "next": "/"})
        assert narrow.status_code == 303
        denied = http.get("/")
        assert denied.status_code == 403 and "may not do this" in denied.text
        assert 'role="alert"' in denied.text
    assert all("lf_" not in entry for entry in fake.seen if not entry.startswith("Bearer "))


# ----- sign-in against the real services with API keys on ---------------------------------


def test_an_app_key_sees_its_own_app_and_refusals_are_messages(tmp_path: Path) -> None:
    from loraforge.auth.v1 import auth_service_pb2 as apb
    from loraforge.auth.v1 import auth_service_pb2_grpc as agrpc

    service_key = "lf_" + "0" * 12 + "_" + "t" * 43
    keys_file = tmp_path / "service-keys"
    keys_file.write_text(f"trainer={service_key}\n")
    auth = {"LORAFORGE_AUTH": "on", "LORAFORGE_AUTH_CACHE_SECONDS": "0.3"}
    started: list[ServiceProcess] = []
    try:
        dataset = start_service(
            "loraforge.services.dataset",
            tmp_path,
            env={**auth, "LORAFORGE_SERVICE_KEYS_FILE": str(keys_file)},
        )
        started.append(dataset)
        trainer = start_service(
            "loraforge.services.trainer",
            tmp_path,
            args=["--dataset-address", dataset.address],
            env={**auth, "LORAFORGE_SERVICE_KEY": service_key},
        )
        started.append(trainer)
        console = start_service(
            "loraforge.services.console",
            tmp_path,
            args=[
                *("--dataset-address", dataset.address, "--trainer-address", trainer.address),
                *("--predictor-address", trainer.address),  # no prediction here
            ],
            env=auth,
        )
        started.append(console)
        admin_key = (tmp_path / "home" / "admin.key").read_text().strip()
        url = f"http://127.0.0.1:{console.port}"
        with httpx.Client(base_url=url, timeout=30) as admin:
            assert admin.post("/login", data={"api_key": admin_key}).status_code == 303
            for app in ("a", "b"):
                assert admin.post("/apps", data={"app_id": app}).status_code == 303
                made = admin.post(f"/apps/{app}/datasets", data={"dataset_id": "d"})
                assert made.status_code == 303, made.text
            assert "lf_" not in admin.get("/").text
        keys = agrpc.AuthServiceStub(channel(dataset.address))
        created = keys.CreateApiKey(
            apb.CreateApiKeyRequest(app="apps/a", scopes=["read"]),
            metadata=[("authorization", f"Bearer {admin_key}")],
        )
        with httpx.Client(base_url=url, timeout=30) as reader:
            assert reader.post("/login", data={"api_key": created.secret}).status_code == 303
            home = reader.get("/")
            assert home.status_code == 200 and 'href="/apps/a"' in home.text
            assert 'href="/apps/b"' not in home.text, "an app key lists its own app only"
            assert reader.get("/apps/a/datasets/d").status_code == 200
            other = reader.get("/apps/b/datasets/d")
            assert other.status_code == 403 and "may not do this" in other.text
            write = reader.post("/apps/a/datasets", data={"dataset_id": "e"})
            assert write.status_code == 403 and 'role="alert"' in write.text
            keys.RevokeApiKey(
                apb.RevokeApiKeyRequest(name=created.api_key.name),
                metadata=[("authorization", f"Bearer {admin_key}")],
            )
            assert wait_until(lambda: reader.get("/").status_code == 303, 30)
            again = reader.get("/apps/a")
            assert again.headers["location"].startswith("/login?next=")
    finally:
        for service in reversed(started):
            service.stop()


# ----- host names: the console answers only for the names it serves -----------------------


def test_a_request_for_a_host_the_console_does_not_serve_is_refused(tmp_path: Path) -> None:
    dataset = start_service("loraforge.services.dataset", tmp_path / "dataset")
    addresses = [
        *("--dataset-address", dataset.address, "--trainer-address", dataset.address),
        *("--predictor-address", dataset.address),
    ]
    console = start_service("loraforge.services.console", tmp_path / "console", args=addresses)
    proxied = start_service(
        "loraforge.services.console",
        tmp_path / "proxied",
        args=[*addresses, "--allowed-hosts", "console.example.org"],
    )
    try:
        url = f"http://127.0.0.1:{console.port}"
        for host in (f"127.0.0.1:{console.port}", f"localhost:{console.port}", "localhost"):
            assert httpx.get(url, headers={"Host": host}, timeout=30).status_code == 200, host
        # A name rebound to this machine by another site: refused before any page runs.
        evil = f"rebound.example.net:{console.port}"
        page = httpx.get(url, headers={"Host": evil}, timeout=30)
        assert page.status_code == 421
        assert "rebound.example.net" in page.text and "--allowed-hosts" in page.text
        posted = httpx.post(
            f"{url}/apps",
            data={"app_id": "rebound"},
            headers={"Host": evil, "Origin": f"http://{evil}"},
            timeout=30,
        )
        assert posted.status_code == 421
        apps = dgrpc.DatasetServiceStub(channel(dataset.address)).ListApps(dpb.ListAppsRequest())
        assert [a.name for a in apps.apps] == []
        # Probes keep working whatever name they use.
        assert httpx.get(f"{url}/health", headers={"Host": evil}, timeout=30).status_code == 200
        # A name the operator allows (a proxy's) is served.
        proxy_url = f"http://127.0.0.1:{proxied.port}"
        allowed = httpx.get(proxy_url, headers={"Host": "console.example.org"}, timeout=30)
        assert allowed.status_code == 200
        other = httpx.get(proxy_url, headers={"Host": "other.example.org"}, timeout=30)
        assert other.status_code == 421
    finally:
        proxied.stop()
        console.stop()
        dataset.stop()
