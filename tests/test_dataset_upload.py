"""Uploads through a real DatasetService process and gRPC channel: formats, bad rows, refusals."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from loraforge.dataset.v1 import dataset_service_pb2 as pb
from loraforge.dataset.v1 import dataset_service_pb2_grpc as pb_grpc
from loraforge.services.dataset.pages import parse_page
from tests.support import ServiceProcess, channel, start_service, wait_until

FORMATS = Path("/work/shared/formats")
if not FORMATS.exists():
    FORMATS = Path(__file__).resolve().parents[2] / "shared" / "formats"
MAX_CHARS = 5000


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    svc = start_service(
        "loraforge.services.dataset",
        tmp_path_factory.mktemp("dataset"),
        args=["--max-example-chars", str(MAX_CHARS)],
    )
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def stub(service: ServiceProcess) -> pb_grpc.DatasetServiceStub:
    return pb_grpc.DatasetServiceStub(channel(service.address))


_counter = iter(range(1, 1_000_000))


@pytest.fixture
def dataset(stub: pb_grpc.DatasetServiceStub) -> str:
    """A fresh, empty dataset; returns its name."""
    app = f"up-{next(_counter)}"
    stub.CreateApp(pb.CreateAppRequest(app_id=app))
    stub.CreateDataset(pb.CreateDatasetRequest(parent=f"apps/{app}", dataset_id="d"))
    return f"apps/{app}/datasets/d"


def upload(
    stub: pb_grpc.DatasetServiceStub,
    dataset: str,
    data: bytes,
    file_name: str = "",
    chunk: int = 64 * 1024,
    **header: object,
) -> pb.UploadInputsResponse:
    def requests() -> Iterator[pb.UploadInputsRequest]:
        yield pb.UploadInputsRequest(
            header=pb.UploadHeader(dataset=dataset, file_name=file_name, **header)  # type: ignore[arg-type]
        )
        for i in range(0, len(data), chunk):
            yield pb.UploadInputsRequest(chunk=data[i : i + chunk])

    return stub.UploadInputs(requests())


def all_inputs(stub: pb_grpc.DatasetServiceStub, dataset: str) -> list[pb.Input]:
    found: list[pb.Input] = []
    token = ""
    while True:
        page = stub.ListInputs(
            pb.ListInputsRequest(parent=dataset, page_size=1000, page_token=token)
        )
        found += page.inputs
        token = page.next_page_token
        if not token:
            return found


def jsonl(*rows: object) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


def bad_request(err: grpc.RpcError) -> tuple[str, list[str]]:
    """The ErrorInfo reason and the BadRequest violation fields of an error."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, "error has no google.rpc.Status details"
    reason, fields = "", []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [v.field for v in bad.field_violations]
    return reason, fields


# The sample files


def test_portal_csv_with_instruction_human_assistant_rows_gives_the_assistant_answers(
    stub: pb_grpc.DatasetServiceStub, dataset: str
) -> None:
    data = (FORMATS / "portal_instruction_human_assistant.csv").read_bytes()
    report = upload(stub, dataset, data, "portal_instruction_human_assistant.csv", chunk=997)
    assert report.detected_format == pb.SOURCE_FORMAT_PORTAL_CSV
    assert (report.rows_read, report.rows_accepted, report.rows_rejected) == (10, 10, 0)
    assert report.bytes_read == len(data)
    assert dict(report.rows_by_markup) == {"TEXT_MARKUP_INSTRUCTION_HUMAN_ASSISTANT": 10}
    inputs = all_inputs(stub, dataset)
    completions = [i.example.completion for i in inputs]
    assert completions == [
        "negative.", "neutral.", "positive.", "negative.", "neutral.",
        "positive.", "negative.", "neutral.", "positive.", "negative.",
    ]  # fmt: skip
    first = inputs[0]
    assert first.example.kind == pb.EXAMPLE_KIND_PROMPT_COMPLETION
    assert first.example.prompt.startswith("### Instruction: What is the sentiment of this tweet?")
    assert first.example.prompt.endswith("EUR 7.6 mn . ### Assistant:")
    assert first.raw == first.example.prompt + " " + first.example.completion
    assert first.source_line == 2
    assert first.source_format == pb.SOURCE_FORMAT_PORTAL_CSV
    assert first.markup == pb.TEXT_MARKUP_INSTRUCTION_HUMAN_ASSISTANT
    assert first.upload_id == report.upload_id
    assert first.name.startswith(dataset + "/inputs/")


def test_portal_csv_with_llama3_header_tokens_gives_the_assistant_turn(
    stub: pb_grpc.DatasetServiceStub, dataset: str
) -> None:
    data = (FORMATS / "portal_llama3_chat.csv").read_bytes()
    report = upload(stub, dataset, data, "portal_llama3_chat.csv")
    assert report.detected_format == pb.SOURCE_FORMAT_PORTAL_CSV
    assert (report.rows_read, report.rows_accepted, report.rows_rejected) == (11, 11, 0)
    assert dict(report.rows_by_markup) == {"TEXT_MARKUP_LLAMA3_HEADERS": 11}
    inputs = all_inputs(stub, dataset)
    assert inputs[0].example.completion == (
        '{"summary": "The smartphone has great battery life and a better camera."}'
    )
    assert inputs[2].example.completion == '{"translation": "El gato está sentado en la alfombra."}'
    assert inputs[-1].example.completion == (
        '{"summary": "The movie is praised for its visuals and storyline."}'
    )
    for item in inputs:
        assert item.example.prompt.endswith("<|start_header_id|>assistant<|end_header_id|>")
        assert "<|eot_id|>" not in item.example.completion
        json.loads(item.example.completion)  # the answers are JSON and must stay whole


# JSONL of each kind, plain text, SDK CSV


@pytest.mark.parametrize(
    ("row", "fmt", "prompt", "completion", "kind"),
    [
        (
            {"prompt": "2+2=", "completion": " 4"},
            pb.SOURCE_FORMAT_JSONL_PROMPT_COMPLETION,
            "2+2=",
            " 4",
            pb.EXAMPLE_KIND_PROMPT_COMPLETION,
        ),
        (
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Capital of France?"},
                    {"role": "assistant", "content": "Paris."},
                ]
            },
            pb.SOURCE_FORMAT_JSONL_CHAT,
            "### System: Be brief.\n\n### User: Capital of France?\n\n### Assistant:",
            "Paris.",
            pb.EXAMPLE_KIND_PROMPT_COMPLETION,
        ),
        (
            {"instruction": "Translate to German", "input": "cat", "output": "Katze"},
            pb.SOURCE_FORMAT_JSONL_ALPACA,
            "### Instruction:\nTranslate to German\n\n### Input:\ncat\n\n### Response:",
            "Katze",
            pb.EXAMPLE_KIND_PROMPT_COMPLETION,
        ),
        (
            {"text": "A plain sentence to learn whole."},
            pb.SOURCE_FORMAT_JSONL_TEXT,
            "",
            "A plain sentence to learn whole.",
            pb.EXAMPLE_KIND_TEXT,
        ),
        (
            {"text": "### Instruction: Add. ### Input: 1 1 ### Response: 2"},
            pb.SOURCE_FORMAT_JSONL_TEXT,
            "### Instruction: Add. ### Input: 1 1 ### Response:",
            "2",
            pb.EXAMPLE_KIND_PROMPT_COMPLETION,
        ),
    ],
    ids=["prompt-completion", "chat", "alpaca", "text", "text-with-markup"],
)
def test_jsonl_of_each_kind_is_detected_and_split(
    stub: pb_grpc.DatasetServiceStub,
    dataset: str,
    row: dict[str, object],
    fmt: int,
    prompt: str,
    completion: str,
    kind: int,
) -> None:
    other = {k: v for k, v in row.items()}
    if "completion" in other:
        other["completion"] = " 5"
    report = upload(stub, dataset, jsonl(row, other), "data.jsonl")
    assert report.detected_format == fmt
    assert report.rows_accepted == 2 and report.rows_rejected == 0
    first = all_inputs(stub, dataset)[0]
    assert (first.example.prompt, first.example.completion, first.example.kind) == (
        prompt,
        completion,
        kind,
    )
    assert json.loads(first.raw) == row
    assert first.source_format == fmt


def test_jsonl_is_detected_from_content_without_a_file_name(
    stub: pb_grpc.DatasetServiceStub, dataset: str
) -> None:
    report = upload(stub, dataset, jsonl({"prompt": "a", "completion": "b"}))
    assert report.detected_format == pb.SOURCE_FORMAT_JSONL_PROMPT_COMPLETION


def test_jsonl_concepts_and_metadata_are_kept(
    stub: pb_grpc.DatasetServiceStub, dataset: str
) -> None:
    row = {
        "prompt": "p",
        "completion": "c",
        "concepts": ["x", "y"],
        "metadata": {"src": "web", "n": 3},
    }
    upload(stub, dataset, jsonl(row), "a.jsonl")
    (item,) = all_inputs(stub, dataset)
    assert list(item.concepts) == ["x", "y"]
    assert dict(item.metadata) == {"src": "web", "n": "3"}


def test_plain_text_is_one_example_per_line_and_blank_lines_are_skipped(
    stub: pb_grpc.DatasetServiceStub, dataset: str
) -> None:
    data = b"first line\n\n   \nsecond line\r\nthird ### Human: hi ### Assistant: hello\n"
    report = upload(stub, dataset, data, "notes.txt")
    assert report.detected_format == pb.SOURCE_FORMAT_PLAIN_TEXT
    assert (report.rows_read, report.rows_accepted) == (3, 3)
    inputs = all_inputs(stub, dataset)
    assert [i.source_line for i in inputs] == [1, 4, 5]
    assert inputs[0].example.kind == pb.EXAMPLE_KIND_TEXT
    assert inputs[0].example.completion == "first line"
    assert inputs[1].example.completion == "second line"  # CRLF does not leak a "\r"
    assert inputs[2].example.completion == "hello"


def test_sdk_csv_with_bom_crlf_and_multiline_quoted_fields(
    stub: pb_grpc.DatasetServiceStub, dataset: str
) -> None:
    text = (
        "inputid,input,concepts,metadata\r\n"
        'id-1,"### Instruction: Summarize.\r\n### Human: A long, long text.\r\n### Assistant: Short.",'
        '"a,b","{""lang"": ""en""}"\r\n'
        "id-2,Just a sentence.,,\r\n"
    )
    data = b"\xef\xbb\xbf" + text.encode()
    report = upload(stub, dataset, data, "export.csv", chunk=7)
    assert report.detected_format == pb.SOURCE_FORMAT_SDK_CSV
    assert (report.rows_read, report.rows_accepted, report.rows_rejected) == (2, 2, 0)
    first, second = all_inputs(stub, dataset)
    assert first.example.completion == "Short."
    assert (
        first.example.prompt
        == "### Instruction: Summarize.\n### Human: A long, long text.\n### Assistant:"
    )
    assert first.source_line == 2
    assert list(first.concepts) == ["a", "b"]
    assert dict(first.metadata) == {"lang": "en", "inputid": "id-1"}
    assert second.source_line == 5
    assert second.example.kind == pb.EXAMPLE_KIND_TEXT


def test_multibyte_characters_split_across_chunks_survive(
    stub: pb_grpc.DatasetServiceStub, dataset: str
) -> None:
    data = jsonl({"prompt": "Grüße 🌍 — ça va?", "completion": "日本語のテキスト"})
    upload(stub, dataset, data, "u.jsonl", chunk=1)
    (item,) = all_inputs(stub, dataset)
    assert item.example.completion == "日本語のテキスト"
    assert item.example.prompt == "Grüße 🌍 — ça va?"


# Good and bad rows together


def test_mixed_file_reports_every_bad_row_with_its_line_and_stores_every_good_row(
    stub: pb_grpc.DatasetServiceStub, dataset: str
) -> None:
    lines = [
        {"prompt": "good 1", "completion": "ok"},  # 1
        '{"prompt": "broken", "completion": ',  # 2 unparseable
        {"prompt": "no answer"},  # 3 missing key
        {"prompt": "good 2", "completion": "ok"},  # 4
        {"prompt": "", "completion": "x"},  # 5 empty text
        "[1, 2]",  # 6 not an object
        {"prompt": 7, "completion": "x"},  # 7 wrong type
        {"prompt": "x" * (MAX_CHARS + 10), "completion": "y"},  # 8 too long
        {"prompt": "good 3", "completion": "ok"},  # 9
    ]
    data = bytearray(jsonl(*lines))
    data += b'{"prompt": "bad \xff\xfe bytes", "completion": "z"}\n'  # 10 invalid UTF-8
    data += jsonl({"prompt": "good 4", "completion": "ok"})  # 11
    report = upload(stub, dataset, bytes(data), "mixed.jsonl", chunk=50)
    assert report.detected_format == pb.SOURCE_FORMAT_JSONL_PROMPT_COMPLETION
    assert (report.rows_read, report.rows_accepted, report.rows_rejected) == (11, 4, 7)
    errors = {e.line: e for e in report.row_errors}
    assert {line: e.code for line, e in errors.items()} == {
        2: "INVALID_JSON",
        3: "MISSING_KEY",
        5: "EMPTY_TEXT",
        6: "NOT_AN_OBJECT",
        7: "WRONG_TYPE",
        8: "TOO_LONG",
        10: "INVALID_UTF8",
    }
    assert errors[3].reason.startswith("row 3: no `completion` key")
    assert errors[2].excerpt == '{"prompt": "broken", "completion": '
    assert "max_example_chars" in errors[8].reason
    assert "UTF-8" in errors[10].reason and "\ufffd" in errors[10].excerpt
    assert not report.row_errors_truncated
    stored = all_inputs(stub, dataset)
    assert [i.example.prompt for i in stored] == ["good 1", "good 2", "good 3", "good 4"]
    assert [i.source_line for i in stored] == [1, 4, 9, 11]


def test_markup_without_an_answer_section_is_rejected_with_a_reason(
    stub: pb_grpc.DatasetServiceStub, dataset: str
) -> None:
    rows = [
        "### Instruction: Classify. ### Human: great movie ### Assistant: positive",
        "### Instruction: Classify. ### Human: terrible movie",
        "### Instruction: Classify. ### Human: meh ### Assistant:   ",
        "### Human: hi ### Assistant: hello ### Human: and?",
        "<|start_header_id|>user<|end_header_id|> hi <|eot_id|>",
        "<|start_header_id|>assistant<|end_header_id|> a<|eot_id|><|start_header_id|>user<|end_header_id|> b",
    ]
    csv_text = "input.data.text.raw,input.data.concepts[*].id\n" + "".join(
        f'"{r}",\n' for r in rows
    )
    report = upload(stub, dataset, csv_text.encode(), "p.csv")
    assert (report.rows_read, report.rows_accepted, report.rows_rejected) == (6, 1, 5)
    by_line = {e.line: e for e in report.row_errors}
    assert by_line[3].code == "NO_COMPLETION"
    assert by_line[3].reason == (
        "row 3: no `### Assistant:` or `### Response:` section, so there is no completion to learn"
    )
    assert by_line[4].code == "EMPTY_COMPLETION"
    assert by_line[5].code == "COMPLETION_NOT_LAST"
    assert by_line[6].code == "NO_COMPLETION" and "assistant" in by_line[6].reason
    assert by_line[7].code == "COMPLETION_NOT_LAST"


def test_csv_row_with_unquoted_separators_or_too_few_fields_is_rejected(
    stub: pb_grpc.DatasetServiceStub, dataset: str
) -> None:
    text = "input,concepts\nfine row,c1\nnot, quoted, text,c2\n,c3\n"
    report = upload(stub, dataset, text.encode(), "s.csv")
    assert (report.rows_read, report.rows_accepted, report.rows_rejected) == (3, 1, 2)
    codes = {e.line: e.code for e in report.row_errors}
    assert codes == {3: "MALFORMED_CSV", 4: "EMPTY_TEXT"}


def test_a_line_longer_than_the_limit_is_dropped_while_streaming_and_reported(
    stub: pb_grpc.DatasetServiceStub, dataset: str
) -> None:
    huge = "y" * (MAX_CHARS * 40)
    data = f"short one\n{huge}\nshort two\n{huge}".encode()
    report = upload(stub, dataset, data, "t.txt", chunk=1000)
    assert (report.rows_read, report.rows_accepted, report.rows_rejected) == (4, 2, 2)
    assert [(e.line, e.code) for e in report.row_errors] == [(2, "TOO_LONG"), (4, "TOO_LONG")]


def test_row_errors_are_capped_but_all_counted(
    stub: pb_grpc.DatasetServiceStub, dataset: str
) -> None:
    data = jsonl({"prompt": "ok", "completion": "ok"}, *(["not json"] * 30))
    report = upload(stub, dataset, data, "x.jsonl", max_row_errors=5)
    assert report.rows_rejected == 30
    assert len(report.row_errors) == 5 and report.row_errors_truncated
    assert [e.line for e in report.row_errors] == [2, 3, 4, 5, 6]


def test_duplicates_are_counted_and_optionally_skipped(
    stub: pb_grpc.DatasetServiceStub, dataset: str
) -> None:
    a, b = {"prompt": "a", "completion": "1"}, {"prompt": "b", "completion": "2"}
    first = upload(stub, dataset, jsonl(a, b, a), "x.jsonl")
    assert (first.rows_accepted, first.duplicate_rows) == (3, 1)
    second = upload(
        stub,
        dataset,
        jsonl(a, {"prompt": "c", "completion": "3"}, b),
        "x.jsonl",
        skip_duplicates=True,
    )
    assert (second.rows_accepted, second.duplicate_rows) == (1, 2)
    assert stub.GetDataset(pb.GetDatasetRequest(name=dataset)).dataset.input_count == 4


# Whole uploads refused


@pytest.mark.parametrize(
    ("data", "file_name", "reason"),
    [
        (b"", "empty.jsonl", "EMPTY_FILE"),
        (b"\n  \r\n\n", "blank.txt", "EMPTY_FILE"),
        (b"input.data.text.raw,input.data.concepts[*].id\n", "header-only.csv", "EMPTY_FILE"),
        (b"text,label\nhello,1\n", "wrong.csv", "WRONG_COLUMNS"),
        (b"\x00\x01\x02binary\x00garbage\n", "blob.bin", "UNKNOWN_FORMAT"),
        (b'[{"prompt": "a", "completion": "b"}]\n', "array.json", "UNKNOWN_FORMAT"),
        (b'{"question": "a", "answer": "b"}\n', "qa.jsonl", "UNKNOWN_FORMAT"),
        ("input\nhello\n".encode("utf-16"), "excel.csv", "UNSUPPORTED_ENCODING"),
    ],
    ids=[
        "empty",
        "blank",
        "header-only",
        "wrong-columns",
        "binary",
        "json-array",
        "unknown-keys",
        "utf16",
    ],
)
def test_unusable_files_are_refused_whole_with_a_field_violation(
    stub: pb_grpc.DatasetServiceStub, dataset: str, data: bytes, file_name: str, reason: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        upload(stub, dataset, data, file_name)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    got_reason, fields = bad_request(caught.value)
    assert got_reason == reason
    assert fields == ["chunk"]
    assert stub.GetDataset(pb.GetDatasetRequest(name=dataset)).dataset.input_count == 0


@pytest.mark.parametrize(
    ("columns", "reason", "words"),
    [
        (1_000_000, "LINE_TOO_LONG", f"longer than the limit of {MAX_CHARS:,} characters on one"),
        (1_200, "TOO_MANY_COLUMNS", "the CSV header has 1,200 columns, more than the 1,000"),
    ],
    ids=["a-million-columns", "too-many-columns"],
)
def test_a_csv_header_too_wide_is_refused_saying_so_not_as_empty(
    stub: pb_grpc.DatasetServiceStub, dataset: str, columns: int, reason: str, words: str
) -> None:
    header = ",".join(["input", *(f"c{i}" for i in range(1, columns))])
    data = f"{header}\nhello,{',' * (columns - 2)}\n".encode()
    with pytest.raises(grpc.RpcError) as caught:
        upload(stub, dataset, data, "wide.csv", chunk=1024 * 1024)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request(caught.value) == (reason, ["chunk"])
    message = caught.value.details() or ""
    assert words in message and "keep only the columns" in message
    assert "empty" not in message


def test_a_jsonl_file_whose_first_line_is_too_long_keeps_its_other_rows(
    stub: pb_grpc.DatasetServiceStub, dataset: str
) -> None:
    data = jsonl({"text": "x" * (MAX_CHARS + 1)}, {"text": "fine"})
    report = upload(stub, dataset, data, "long.jsonl")
    assert (report.rows_accepted, report.rows_rejected) == (1, 1)
    assert report.row_errors[0].line == 1 and "max_example_chars" in report.row_errors[0].reason


def test_wrong_columns_message_names_the_columns_found_and_the_ones_needed(
    stub: pb_grpc.DatasetServiceStub, dataset: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        upload(stub, dataset, b"text,label\nhello,1\n", "wrong.csv")
    message = caught.value.details()
    assert (
        "`text`, `label`" in message and "input.data.text.raw" in message and "`input`" in message
    )


def test_requested_format_that_does_not_match_the_columns_is_refused(
    stub: pb_grpc.DatasetServiceStub, dataset: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        upload(stub, dataset, b"input\nhello\n", "x.csv", format=pb.SOURCE_FORMAT_PORTAL_CSV)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request(caught.value) == ("WRONG_COLUMNS", ["chunk"])


# Careless or hostile streams


def test_upload_without_a_header_message_is_refused(
    stub: pb_grpc.DatasetServiceStub, dataset: str
) -> None:
    for messages in ([], [pb.UploadInputsRequest(chunk=b'{"prompt": "a", "completion": "b"}\n')]):
        with pytest.raises(grpc.RpcError) as caught:
            stub.UploadInputs(iter(messages))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_request(caught.value) == ("MISSING_HEADER", ["header"])


def test_a_second_header_is_refused_and_nothing_is_stored(
    stub: pb_grpc.DatasetServiceStub, dataset: str
) -> None:
    header = pb.UploadInputsRequest(header=pb.UploadHeader(dataset=dataset, file_name="a.jsonl"))
    messages = [
        header,
        pb.UploadInputsRequest(chunk=jsonl({"prompt": "a", "completion": "b"})),
        header,
    ]
    with pytest.raises(grpc.RpcError) as caught:
        stub.UploadInputs(iter(messages))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request(caught.value) == ("DUPLICATE_HEADER", ["header"])
    assert stub.GetDataset(pb.GetDatasetRequest(name=dataset)).dataset.input_count == 0


@pytest.mark.parametrize(
    ("header", "field", "code"),
    [
        (pb.UploadHeader(dataset=""), "header.dataset", grpc.StatusCode.INVALID_ARGUMENT),
        (pb.UploadHeader(dataset="apps/x"), "header.dataset", grpc.StatusCode.INVALID_ARGUMENT),
        (
            pb.UploadHeader(dataset="apps/Bad App/datasets/d"),
            "header.dataset",
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            pb.UploadHeader(dataset="apps/a/datasets/d", format=99),
            "header.format",
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            pb.UploadHeader(dataset="apps/a/datasets/d", max_row_errors=-1),
            "header.max_row_errors",
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (pb.UploadHeader(dataset="apps/nope/datasets/d"), None, grpc.StatusCode.NOT_FOUND),
    ],
    ids=[
        "no-dataset",
        "not-a-dataset-name",
        "bad-id",
        "unknown-format",
        "negative-cap",
        "missing-dataset",
    ],
)
def test_bad_headers_are_refused(
    stub: pb_grpc.DatasetServiceStub,
    header: pb.UploadHeader,
    field: str | None,
    code: grpc.StatusCode,
) -> None:
    messages = [pb.UploadInputsRequest(header=header), pb.UploadInputsRequest(chunk=b"hello\n")]
    with pytest.raises(grpc.RpcError) as caught:
        stub.UploadInputs(iter(messages))
    assert caught.value.code() == code
    if field is not None:
        assert bad_request(caught.value)[1] == [field]


def input_count(stub: pb_grpc.DatasetServiceStub, dataset: str) -> int:
    return stub.GetDataset(pb.GetDatasetRequest(name=dataset)).dataset.input_count


def test_a_cancelled_upload_removes_what_it_had_stored(
    stub: pb_grpc.DatasetServiceStub, dataset: str, service: ServiceProcess
) -> None:
    release = threading.Event()

    def requests() -> Iterator[pb.UploadInputsRequest]:
        yield pb.UploadInputsRequest(header=pb.UploadHeader(dataset=dataset, file_name="c.jsonl"))
        # More rows than one transaction holds, so some are committed before the cancel.
        rows = jsonl(*({"prompt": f"p{i}", "completion": "c"} for i in range(120_000)))
        for i in range(0, len(rows), 1 << 20):
            yield pb.UploadInputsRequest(chunk=rows[i : i + (1 << 20)])
        release.wait()  # the client never finishes the file; it cancels instead

    database = service.log_path.parent / "home" / "dataset.db"

    def committed() -> int:
        with contextlib.closing(sqlite3.connect(database)) as db:
            return db.execute("SELECT count(*) FROM inputs").fetchone()[0]

    before = committed()
    future = stub.UploadInputs.future(requests())
    try:
        assert wait_until(lambda: committed() > before), "no rows were committed"
        # Committed in parts, but no one sees them before the upload is done.
        assert input_count(stub, dataset) == 0 and all_inputs(stub, dataset) == []
        future.cancel()
        assert wait_until(lambda: committed() == before), "the rows were not removed"
    finally:
        release.set()
    assert all_inputs(stub, dataset) == []
    assert wait_until(lambda: f"into {dataset} failed; removed" in service.log())


def test_a_cancel_at_the_end_of_the_stream_stores_nothing(
    stub: pb_grpc.DatasetServiceStub, dataset: str, service: ServiceProcess
) -> None:
    sent = threading.Event()
    release = threading.Event()

    def requests() -> Iterator[pb.UploadInputsRequest]:
        yield pb.UploadInputsRequest(header=pb.UploadHeader(dataset=dataset, file_name="e.jsonl"))
        yield pb.UploadInputsRequest(chunk=jsonl({"prompt": "p", "completion": "c"}))
        sent.set()
        release.wait()  # every row sent, but the stream is never closed: the client cancels

    future = stub.UploadInputs.future(requests())
    try:
        assert sent.wait(30)
        # Cancel once the server is inside the upload (a cancel that overtakes the header
        # never starts one, and proves nothing).
        assert wait_until(lambda: f"into {dataset} started" in service.log())
        future.cancel()
    finally:
        release.set()
    with pytest.raises(grpc.FutureCancelledError):
        future.result()
    failed, stored = f"into {dataset} failed; removed", f"into {dataset}: "
    assert wait_until(lambda: failed in service.log() or stored in service.log())
    assert failed in service.log() and stored not in service.log()
    assert input_count(stub, dataset) == 0


class _CancelledCall:
    """The server side of a call the client cancelled right after its last chunk.

    The stream ends as if the file were complete, and grpc reports the cancel itself only
    later (here: after the handler has returned). Like any cancelled call, it refuses to
    send anything.
    """

    def __init__(self) -> None:
        self.done_callbacks: list[Callable[[object], None]] = []

    def add_done_callback(self, callback: Callable[[object], None]) -> None:
        self.done_callbacks.append(callback)

    async def send_initial_metadata(self, metadata: object) -> None:
        raise grpc.aio.InternalError("Failed 'execute_batch'")


def test_a_cancel_reported_late_is_never_committed_as_a_complete_file(tmp_path: Path) -> None:
    from loraforge.services.common.errors import Aborted
    from loraforge.services.common.objectstore import LocalObjectStore
    from loraforge.services.dataset.servicer import DatasetServicer
    from loraforge.services.dataset.store import DatasetStore
    from loraforge.services.dataset.uploads import Uploader
    from loraforge.services.dataset.versions import Versions

    store = DatasetStore(
        f"sqlite:///{tmp_path / 'dataset.db'}",
        LocalObjectStore(tmp_path / "objects"),
        "datasets",
        tmp_path / "scratch",
    )
    try:
        store.catalog.create_app("a", "")
        store.catalog.create_dataset("a", "d", "")
        servicer = DatasetServicer(
            store,
            Uploader(store.inputs, max_example_chars=MAX_CHARS, batch_rows=100),
            Versions(store),
            max_example_chars=MAX_CHARS,
        )
        call = _CancelledCall()

        async def messages() -> AsyncIterator[pb.UploadInputsRequest]:
            yield pb.UploadInputsRequest(
                header=pb.UploadHeader(dataset="apps/a/datasets/d", file_name="f.jsonl")
            )
            yield pb.UploadInputsRequest(chunk=jsonl({"prompt": "p", "completion": "c"}))

        with pytest.raises(Aborted) as caught:
            asyncio.run(servicer.UploadInputs(messages(), call))  # type: ignore[arg-type]
        assert caught.value.reason == "CANCELLED"
        assert store.catalog.get_dataset("a", "d").input_count == 0
        assert store.inputs.list_inputs("a", "d", parse_page(10, "", "x"))[0] == []
    finally:
        store.close()


# AddInputs, ListInputs, DeleteInputs


def test_add_list_and_delete_inputs(stub: pb_grpc.DatasetServiceStub, dataset: str) -> None:
    added = stub.AddInputs(
        pb.AddInputsRequest(
            parent=dataset,
            inputs=[
                pb.NewInput(
                    example=pb.Example(prompt="Q1", completion="A1"),
                    concepts=["c"],
                    metadata={"k": "v"},
                ),
                pb.NewInput(example=pb.Example(completion="just text")),
                pb.NewInput(example=pb.Example(prompt="Q3", completion="A3"), raw="Q3 -> A3"),
            ],
        )
    ).inputs
    assert [i.example.kind for i in added] == [
        pb.EXAMPLE_KIND_PROMPT_COMPLETION,
        pb.EXAMPLE_KIND_TEXT,
        pb.EXAMPLE_KIND_PROMPT_COMPLETION,
    ]
    assert added[0].raw == "Q1A1" and added[2].raw == "Q3 -> A3"
    assert added[0].source_format == pb.SOURCE_FORMAT_STRUCTURED
    assert dict(added[0].metadata) == {"k": "v"}

    page1 = stub.ListInputs(pb.ListInputsRequest(parent=dataset, page_size=2))
    assert [i.name for i in page1.inputs] == [a.name for a in added[:2]]
    assert page1.total_size == 3 and page1.next_page_token
    page2 = stub.ListInputs(
        pb.ListInputsRequest(parent=dataset, page_size=2, page_token=page1.next_page_token)
    )
    assert [i.name for i in page2.inputs] == [added[2].name] and not page2.next_page_token

    deleted = stub.DeleteInputs(
        pb.DeleteInputsRequest(
            parent=dataset, names=[added[0].name, added[0].name, dataset + "/inputs/999999"]
        )
    )
    assert deleted.deleted_count == 1
    assert stub.DeleteInputs(pb.DeleteInputsRequest(parent=dataset, all=True)).deleted_count == 2
    assert stub.GetDataset(pb.GetDatasetRequest(name=dataset)).dataset.input_count == 0


def test_add_inputs_is_all_or_nothing_with_one_violation_per_bad_field(
    stub: pb_grpc.DatasetServiceStub, dataset: str
) -> None:
    request = pb.AddInputsRequest(
        parent=dataset,
        inputs=[
            pb.NewInput(example=pb.Example(prompt="fine", completion="fine")),
            pb.NewInput(example=pb.Example(prompt="no answer")),
            pb.NewInput(example=pb.Example(prompt="p", completion="c", kind=pb.EXAMPLE_KIND_TEXT)),
            pb.NewInput(example=pb.Example(completion="x" * (MAX_CHARS + 1))),
        ],
    )
    with pytest.raises(grpc.RpcError) as caught:
        stub.AddInputs(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request(caught.value)[1] == [
        "inputs[1].example.completion",
        "inputs[2].example.prompt",
        "inputs[3].example",
    ]
    assert stub.GetDataset(pb.GetDatasetRequest(name=dataset)).dataset.input_count == 0


def test_delete_inputs_refuses_names_of_another_dataset_and_ambiguous_requests(
    stub: pb_grpc.DatasetServiceStub, dataset: str
) -> None:
    cases = [
        (
            pb.DeleteInputsRequest(parent=dataset, names=["apps/other/datasets/d/inputs/1"]),
            "names[0]",
        ),
        (pb.DeleteInputsRequest(parent=dataset, names=["not a name"]), "names[0]"),
        (pb.DeleteInputsRequest(parent=dataset, names=[dataset + "/inputs/1"], all=True), "names"),
        (pb.DeleteInputsRequest(parent=dataset), "names"),
    ]
    for request, field in cases:
        with pytest.raises(grpc.RpcError) as caught:
            stub.DeleteInputs(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_request(caught.value)[1] == [field]


def test_list_inputs_rejects_bad_page_tokens(
    stub: pb_grpc.DatasetServiceStub, dataset: str
) -> None:
    stub.AddInputs(
        pb.AddInputsRequest(
            parent=dataset, inputs=[pb.NewInput(example=pb.Example(completion="x"))] * 3
        )
    )
    token = stub.ListInputs(pb.ListInputsRequest(parent=dataset, page_size=1)).next_page_token
    other = dataset.replace("/datasets/d", "/datasets/e")
    stub.CreateDataset(
        pb.CreateDatasetRequest(parent=dataset.rsplit("/datasets/", 1)[0], dataset_id="e")
    )
    for parent, bad in [(dataset, "garbage!!"), (dataset, "eyJhZnRlciI6ICJ4In0="), (other, token)]:
        with pytest.raises(grpc.RpcError) as caught:
            stub.ListInputs(pb.ListInputsRequest(parent=parent, page_token=bad))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_request(caught.value)[0] == "INVALID_PAGE_TOKEN"
