"""Labels as completions: a labelled CSV (`input,concepts`) uploaded through a real
DatasetService process becomes prompt-completion examples, the concepts the completion and
the input wrapped in the user's instruction template."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from loraforge.client import Client
from loraforge.client.cli import main as cli_main
from loraforge.dataset.v1 import dataset_service_pb2 as pb
from loraforge.dataset.v1 import dataset_service_pb2_grpc as pb_grpc
from tests.support import ServiceProcess, channel, error_details, start_service

TEMPLATE = "Classify the sentiment of this review.\n\n{input}\n\nSentiment:"

LABELLED_CSV = (
    b"input,concepts,inputid\n"
    b'"Great shoes, fast delivery.",positive,r1\n'
    b'"Broke after a week.\nNever again.",negative,r2\n'
    b"Arrived on Tuesday.,,r3\n"
    b'Nice colour but too small.,"positive,negative",r4\n'
)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    svc = start_service("loraforge.services.dataset", tmp_path_factory.mktemp("dataset"))
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def stub(service: ServiceProcess) -> pb_grpc.DatasetServiceStub:
    return pb_grpc.DatasetServiceStub(channel(service.address))


_counter = iter(range(1, 1_000_000))


@pytest.fixture
def dataset(stub: pb_grpc.DatasetServiceStub) -> str:
    app = f"labels-{next(_counter)}"
    stub.CreateApp(pb.CreateAppRequest(app_id=app))
    stub.CreateDataset(pb.CreateDatasetRequest(parent=f"apps/{app}", dataset_id="d"))
    return f"apps/{app}/datasets/d"


def upload(
    stub: pb_grpc.DatasetServiceStub,
    dataset: str,
    data: bytes,
    file_name: str,
    labels: pb.LabelCompletions | None,
) -> pb.UploadInputsResponse:
    def requests() -> Iterator[pb.UploadInputsRequest]:
        yield pb.UploadInputsRequest(
            header=pb.UploadHeader(dataset=dataset, file_name=file_name, label_completions=labels)
        )
        yield pb.UploadInputsRequest(chunk=data)

    return stub.UploadInputs(requests())


def inputs_of(stub: pb_grpc.DatasetServiceStub, dataset: str) -> list[pb.Input]:
    page = stub.ListInputs(pb.ListInputsRequest(parent=dataset, page_size=1000))
    return sorted(page.inputs, key=lambda i: i.source_line)


def test_labelled_csv_rows_become_template_prompts_with_their_concepts_as_completions(
    stub: pb_grpc.DatasetServiceStub, dataset: str
) -> None:
    report = upload(
        stub,
        dataset,
        LABELLED_CSV,
        "reviews.csv",
        pb.LabelCompletions(instruction_template=TEMPLATE, separator=" | "),
    )
    assert report.detected_format == pb.SOURCE_FORMAT_SDK_CSV
    assert (report.rows_read, report.rows_accepted, report.rows_rejected) == (4, 3, 1)
    assert dict(report.rows_by_markup) == {"TEXT_MARKUP_LABEL_COMPLETION": 3}
    # The row without concepts is rejected with its line and what to do; the others stay.
    [error] = report.row_errors
    assert (error.line, error.code) == (5, "NO_CONCEPTS")
    assert "row 5: the `concepts` cell is empty" in error.reason
    assert "give the row its concept(s)" in error.reason
    assert error.excerpt == "Arrived on Tuesday."

    got = inputs_of(stub, dataset)
    assert [(i.example.prompt, i.example.completion) for i in got] == [
        (TEMPLATE.replace("{input}", "Great shoes, fast delivery."), "positive"),
        (TEMPLATE.replace("{input}", "Broke after a week.\nNever again."), "negative"),
        (TEMPLATE.replace("{input}", "Nice colour but too small."), "positive | negative"),
    ]
    assert all(i.example.kind == pb.EXAMPLE_KIND_PROMPT_COMPLETION for i in got)
    assert all(i.markup == pb.TEXT_MARKUP_LABEL_COMPLETION for i in got)
    # The row keeps its own text, concepts and id.
    assert got[1].raw == "Broke after a week.\nNever again."
    assert list(got[2].concepts) == ["positive", "negative"]
    assert got[0].metadata["inputid"] == "r1"


def test_without_label_completions_the_same_csv_is_read_as_plain_texts(
    stub: pb_grpc.DatasetServiceStub, dataset: str
) -> None:
    report = upload(stub, dataset, LABELLED_CSV, "reviews.csv", None)
    assert (report.rows_read, report.rows_accepted) == (4, 4)
    assert dict(report.rows_by_markup) == {"TEXT_MARKUP_NONE": 4}
    first = inputs_of(stub, dataset)[0]
    assert first.example.kind == pb.EXAMPLE_KIND_TEXT
    assert first.example.completion == "Great shoes, fast delivery."


def test_labels_default_to_a_comma_separator_and_read_the_portal_layout(
    stub: pb_grpc.DatasetServiceStub, dataset: str
) -> None:
    data = (
        b"input.data.text.raw,input.data.concepts[*].id\n"
        b'"### Instruction: keep me whole ### Assistant: not split",positive\n'
        b'Too small.,"[""negative"", ""size""]"\n'
    )
    report = upload(
        stub, dataset, data, "portal.csv", pb.LabelCompletions(instruction_template="Q: {input}")
    )
    assert (report.rows_accepted, report.rows_rejected) == (2, 0)
    got = inputs_of(stub, dataset)
    assert [(i.example.prompt, i.example.completion) for i in got] == [
        ("Q: ### Instruction: keep me whole ### Assistant: not split", "positive"),
        ("Q: Too small.", "negative, size"),
    ]


@pytest.mark.parametrize(
    ("template", "reason", "words"),
    [
        ("Classify this review.", "NO_INPUT_PLACEHOLDER", "the template has no `{input}`"),
        ("", "NO_INPUT_PLACEHOLDER", "write `{input}` where the input goes"),
        ("{input}" + "x" * 4000, "INVALID_FIELD", "at most 4,000"),
    ],
)
def test_a_template_without_its_input_placeholder_is_refused_before_any_row_is_stored(
    stub: pb_grpc.DatasetServiceStub, dataset: str, template: str, reason: str, words: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        upload(
            stub,
            dataset,
            LABELLED_CSV,
            "reviews.csv",
            pb.LabelCompletions(instruction_template=template),
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    got_reason, fields = error_details(caught.value)
    assert got_reason == reason
    assert words in fields["header.label_completions.instruction_template"]
    assert inputs_of(stub, dataset) == []


@pytest.mark.parametrize(
    ("data", "file_name", "reason", "words"),
    [
        (b'{"prompt": "p", "completion": "c"}\n', "x.jsonl", "LABELS_NEED_CSV", "JSONL"),
        (b"input,label\nGreat.,positive\n", "x.csv", "NO_CONCEPTS_COLUMN", "no `concepts` column"),
    ],
)
def test_label_completions_refuse_a_file_that_has_no_labels_column(
    stub: pb_grpc.DatasetServiceStub,
    dataset: str,
    data: bytes,
    file_name: str,
    reason: str,
    words: str,
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        upload(stub, dataset, data, file_name, pb.LabelCompletions(instruction_template="{input}"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    got_reason, fields = error_details(caught.value)
    assert got_reason == reason
    assert words in fields["header.label_completions"]
    assert inputs_of(stub, dataset) == []


def test_an_example_too_long_once_in_its_template_is_rejected_as_its_row(
    tmp_path: Path,
) -> None:
    with_limit = start_service(
        "loraforge.services.dataset", tmp_path, args=["--max-example-chars", "60"]
    )
    try:
        stub = pb_grpc.DatasetServiceStub(channel(with_limit.address))
        stub.CreateApp(pb.CreateAppRequest(app_id="short"))
        stub.CreateDataset(pb.CreateDatasetRequest(parent="apps/short", dataset_id="d"))
        data = b"input,concepts\nFine.,positive\n" + b"y" * 40 + b",negative\n"
        report = upload(
            stub,
            "apps/short/datasets/d",
            data,
            "x.csv",
            pb.LabelCompletions(instruction_template="Classify this review: {input}"),
        )
    finally:
        with_limit.stop()
    assert (report.rows_accepted, report.rows_rejected) == (1, 1)
    [error] = report.row_errors
    assert (error.line, error.code) == (3, "TOO_LONG")
    assert "shorten the template or the input" in error.reason


def test_client_and_cli_upload_labelled_csvs_with_an_instruction_template(
    service: ServiceProcess,
    stub: pb_grpc.DatasetServiceStub,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "reviews.csv"
    path.write_bytes(LABELLED_CSV)
    with Client(dataset=service.address) as client:
        dataset = client.create_app("labels-client").create_dataset("d")
        report = dataset.upload_from_csv(path, label_completions="Review: {input}")
        assert (report.rows_accepted, report.rows_rejected) == (3, 1)
        assert inputs_of(stub, dataset.name)[2].example.completion == "positive, negative"

    stub.CreateApp(pb.CreateAppRequest(app_id="labels-cli"))
    stub.CreateDataset(pb.CreateDatasetRequest(parent="apps/labels-cli", dataset_id="d"))
    cli = ["--dataset-address", service.address, "upload", "labels-cli/d", str(path)]
    assert cli_main([*cli, "--label-completions", "Review: {input}", "--label-separator", "+"]) == 0
    got = inputs_of(stub, "apps/labels-cli/datasets/d")
    assert [i.example.completion for i in got] == ["positive", "negative", "positive+negative"]
    assert got[0].example.prompt == "Review: Great shoes, fast delivery."
    # A template without `{input}` is one clear error and a non-zero exit.
    capsys.readouterr()
    assert cli_main([*cli, "--label-completions", "Review:"]) == 1
    err = capsys.readouterr().err
    assert "header.label_completions.instruction_template" in err
    assert "the template has no `{input}`" in err
