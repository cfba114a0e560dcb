"""Upload parsing: detect a file's format, then turn every row into an example or a row error.

The input is an iterator of byte chunks (the upload stream) and the output is batches of
parsed rows and row errors, so a file of any size is parsed in bounded memory: the only
text held at once is one chunk plus one unfinished line (and, for CSV, one record), and a
line longer than the example limit is dropped while it streams past, not accumulated.

Formats (the README lists them for users):
- CSV, portal layout (`input.data.text.raw`, `input.data.concepts[*].id`) or SDK layout
  (`input`, optionally `concepts`, `inputid`, `metadata`); comma, tab or semicolon separated.
- JSONL: `{"prompt","completion"}`, `{"messages":[{role,content}]}`, `{"instruction",
  "input","output"}` or `{"text"}`; optional `concepts` (list) and `metadata` (object).
- Plain text, one example per line.

A free text (a CSV cell, a plain-text line, a JSONL `text`) is split by its markup: `###`
sections (`### Instruction/Human/Assistant`, `### Instruction/Input/Response`) or Llama-3
header tokens. The completion is what follows the last assistant/response marker; the
prompt is everything up to and including that marker. A text without markup is a TEXT
example learned whole. A text that has markup but no answer section is rejected: it was
meant to be a pair, and training on it as plain text would teach the wrong thing.

With `LabelCompletions`, a labelled CSV (text classification recast as generation, as the
seed SDK's `input,concepts` files are) is read differently: the text cell is not split by
markup but put whole into the user's instruction template as the prompt, and the row's
concepts are the completion; a row without concepts has nothing to learn and is rejected.

Invalid UTF-8 is decoded with `surrogateescape`, so one bad byte costs only its own row
(rejected as INVALID_UTF8), never the file.
"""

from __future__ import annotations

import codecs
import csv
import itertools
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, NamedTuple

from loraforge.services.common.errors import InvalidArgument, invalid_field
from loraforge.services.common.values import (
    MAX_JSON_DEPTH,
    check_text,
    nests_deeper,
    text_problem,
)
from loraforge.services.dataset.domain import ExampleKind, Markup, RowError, SourceFormat

# The request field that carries the file's bytes; refusals of the whole file name it.
FILE_FIELD = "chunk"
EXCERPT_CHARS = 200
# Format detection looks at this much of the start of the file.
SNIFF_CHARS = 64 * 1024
SNIFF_LINES = 50
CSV_BATCH_ROWS = 4096
MAX_CSV_COLUMNS = 1000  # a header wider than this is not a layout this service reads
CSV_BATCH_BYTES = 4 * 1024 * 1024

PORTAL_TEXT_COLUMN = "input.data.text.raw"
PORTAL_CONCEPTS_COLUMN = "input.data.concepts[*].id"
PORTAL_METADATA_COLUMN = "input.data.metadata"
PORTAL_ID_COLUMN = "input.id"
SDK_TEXT_COLUMN = "input"
SDK_CONCEPTS_COLUMN = "concepts"

INPUT_PLACEHOLDER = "{input}"
MAX_INSTRUCTION_TEMPLATE_CHARS = 4000
MAX_LABEL_SEPARATOR_CHARS = 100
DEFAULT_LABEL_SEPARATOR = ", "

CSV_FORMATS = (SourceFormat.PORTAL_CSV, SourceFormat.SDK_CSV)
JSONL_FORMATS = (
    SourceFormat.JSONL_PROMPT_COMPLETION,
    SourceFormat.JSONL_CHAT,
    SourceFormat.JSONL_ALPACA,
    SourceFormat.JSONL_TEXT,
)

_SURROGATE = re.compile("[\udc80-\udcff]")
_LLAMA_HEADER = "<|start_header_id|>"
_LLAMA_ASSISTANT = re.compile(r"<\|start_header_id\|>\s*assistant\s*<\|end_header_id\|>")
_LLAMA_EOT = "<|eot_id|>"
_LLAMA_END = "<|end_of_text|>"
_SECTION = re.compile(
    r"###\s*(instruction|human|assistant|input|response|system|user|context)\b\s*:?",
    re.IGNORECASE,
)
_ANSWER_SECTIONS = ("assistant", "response")
_CHAT_ROLES = ("system", "user", "assistant", "tool")


class ParsedRow(NamedTuple):
    """An accepted row: its example, original text and provenance."""

    line: int
    kind: ExampleKind
    prompt: str
    completion: str
    raw: str
    markup: Markup
    concepts: tuple[str, ...]
    metadata: dict[str, str] | None


@dataclass
class Batch:
    """Rows parsed from a stretch of the file, in file order, and the rows rejected there."""

    rows: list[ParsedRow] = field(default_factory=list)
    errors: list[RowError] = field(default_factory=list)


class Reject(Exception):
    """Why one row cannot be used: a machine code and a sentence for people."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _excerpt(text: str) -> str:
    text = text[:EXCERPT_CHARS]
    # An excerpt of a row with invalid bytes must itself be sendable as UTF-8.
    return _SURROGATE.sub("\ufffd", text)


def _row_error(line: int, err: Reject, raw: str) -> RowError:
    return RowError(line, err.code, f"row {line}: {err.reason}", _excerpt(raw))


def _refuse_nul(text: str) -> None:
    """Text fields cannot hold a NUL character (U+0000): a row with one is refused."""
    problem = text_problem(text)
    if problem is not None:
        raise Reject("NUL_CHARACTER", f"the text {problem}")


def _too_long(length: int | None, limit: int) -> Reject:
    size = f"{length:,} characters" if length is not None else "longer than that"
    return Reject(
        "TOO_LONG",
        f"the row is {size}, over the limit of {limit:,} (max_example_chars); "
        "shorten or split it, or raise the limit",
    )


def _invalid_utf8(text: str) -> Reject:
    at = _SURROGATE.search(text)
    where = f" at character {at.start() + 1}" if at else ""
    return Reject(
        "INVALID_UTF8",
        f"the row has bytes that are not valid UTF-8{where}; save the file as UTF-8",
    )


Example = tuple[ExampleKind, str, str, Markup]


# Labels as completions


@dataclass(frozen=True)
class LabelCompletions:
    """Labelled rows as prompt-completion pairs: the row's input in `instruction_template`
    (at every `{input}`) is the prompt, its concepts joined by `separator` the completion."""

    instruction_template: str
    separator: str = DEFAULT_LABEL_SEPARATOR

    @classmethod
    def checked(cls, instruction_template: str, separator: str, field: str) -> LabelCompletions:
        """The options if they can be used; InvalidArgument naming `field`'s part otherwise."""
        template_field = f"{field}.instruction_template"
        check_text(instruction_template, template_field, MAX_INSTRUCTION_TEMPLATE_CHARS)
        if INPUT_PLACEHOLDER not in instruction_template:
            raise invalid_field(
                template_field,
                f"the template has no `{INPUT_PLACEHOLDER}`, so a row's input would not be in "
                f"its prompt; write `{INPUT_PLACEHOLDER}` where the input goes, e.g. "
                f'"Classify this review.\\n\\n{INPUT_PLACEHOLDER}"',
                reason="NO_INPUT_PLACEHOLDER",
            )
        check_text(separator, f"{field}.separator", MAX_LABEL_SEPARATOR_CHARS)
        return cls(instruction_template, separator or DEFAULT_LABEL_SEPARATOR)

    def example(self, text: str, concepts: tuple[str, ...], column: str, limit: int) -> Example:
        labels = [c.strip() for c in concepts if c.strip()]
        if not labels:
            raise Reject(
                "NO_CONCEPTS",
                f"the `{column}` cell is empty, so there is no label to learn as the "
                "completion; give the row its concept(s) or leave the row out",
            )
        prompt = self.instruction_template.replace(INPUT_PLACEHOLDER, text)
        completion = self.separator.join(labels)
        length = len(prompt) + len(completion)
        if length > limit:
            raise Reject(
                "TOO_LONG",
                f"in the instruction template with its labels the example is {length:,} "
                f"characters, over the limit of {limit:,} (max_example_chars); shorten the "
                "template or the input, or raise the limit",
            )
        return ExampleKind.PROMPT_COMPLETION, prompt, completion, Markup.LABEL_COMPLETION


# Free text: markup -> (kind, prompt, completion, markup)


def split_text(text: str) -> Example:
    """Splits a free text into prompt and completion by its markup; no markup means TEXT."""
    if _LLAMA_HEADER in text:
        return _split_llama3(text)
    if "###" in text:
        example = _split_sections(text)
        if example is not None:
            return example
    return ExampleKind.TEXT, "", text, Markup.NONE


def _split_llama3(text: str) -> Example:
    last = None
    for last in _LLAMA_ASSISTANT.finditer(text):  # noqa: B007 - the last match is the one
        pass
    if last is None:
        raise Reject(
            "NO_COMPLETION",
            "no `<|start_header_id|>assistant<|end_header_id|>` header, so there is no "
            "completion to learn; end the text with the assistant's turn",
        )
    rest = text[last.end() :]
    end = rest.find(_LLAMA_EOT)
    after = rest[end + len(_LLAMA_EOT) :] if end >= 0 else ""
    if end >= 0:
        rest = rest[:end]
    if _LLAMA_HEADER in rest or _LLAMA_HEADER in after:
        raise Reject(
            "COMPLETION_NOT_LAST",
            "another turn follows the last assistant turn; the completion to learn must be the "
            "final turn, so end the text with the assistant's answer",
        )
    completion = rest.strip().removesuffix(_LLAMA_END).strip()
    if not completion:
        raise Reject(
            "EMPTY_COMPLETION", "the assistant turn is empty, so there is nothing to learn"
        )
    return ExampleKind.PROMPT_COMPLETION, text[: last.end()], completion, Markup.LLAMA3_HEADERS


def _split_sections(text: str) -> Example | None:
    sections = list(_SECTION.finditer(text))
    if not sections:
        return None  # `###` used for something else: plain text
    answer = None
    for i, section in enumerate(sections):
        if section.group(1).lower() in _ANSWER_SECTIONS:
            answer = i
    if answer is None:
        raise Reject(
            "NO_COMPLETION",
            "no `### Assistant:` or `### Response:` section, so there is no completion to learn",
        )
    marker = sections[answer]
    marker_text = marker.group(0).strip()
    if answer != len(sections) - 1:
        following = sections[answer + 1].group(0).strip()
        raise Reject(
            "COMPLETION_NOT_LAST",
            f"a `{following}` section follows the last `{marker_text}` one; the completion to "
            "learn must be the last section",
        )
    completion = text[marker.end() :].strip()
    if not completion:
        raise Reject(
            "EMPTY_COMPLETION",
            f"the `{marker_text}` section is empty, so there is nothing to learn",
        )
    markup = (
        Markup.INSTRUCTION_INPUT_RESPONSE
        if marker.group(1).lower() == "response"
        else Markup.INSTRUCTION_HUMAN_ASSISTANT
    )
    return ExampleKind.PROMPT_COMPLETION, text[: marker.end()], completion, markup


# JSONL records -> example


def _string(obj: dict[str, Any], key: str, need: str) -> str:
    if key not in obj:
        raise Reject("MISSING_KEY", f"no `{key}` key; each line of this file needs {need}")
    value = obj[key]
    if not isinstance(value, str):
        raise Reject("WRONG_TYPE", f"`{key}` must be a string, not {_json_type(value)}")
    if not value.strip():
        raise Reject("EMPTY_TEXT", f"`{key}` is empty")
    return value


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return "a string"


def _from_prompt_completion(obj: dict[str, Any]) -> Example:
    prompt, completion = obj.get("prompt"), obj.get("completion")
    if (  # the common case, checked without building anything
        type(prompt) is str
        and type(completion) is str
        and prompt
        and completion
        and not prompt.isspace()
        and not completion.isspace()
    ):
        return ExampleKind.PROMPT_COMPLETION, prompt, completion, Markup.STRUCTURED
    need = "`prompt` and `completion`"
    prompt = _string(obj, "prompt", need)
    completion = _string(obj, "completion", need)
    return ExampleKind.PROMPT_COMPLETION, prompt, completion, Markup.STRUCTURED


def _from_alpaca(obj: dict[str, Any]) -> Example:
    need = "`instruction` and `output` (and optionally `input`)"
    instruction = _string(obj, "instruction", need)
    output = _string(obj, "output", need)
    extra = obj.get("input")
    if extra is not None and not isinstance(extra, str):
        raise Reject("WRONG_TYPE", f"`input` must be a string, not {_json_type(extra)}")
    prompt = f"### Instruction:\n{instruction}\n\n"
    if extra and extra.strip():
        prompt += f"### Input:\n{extra}\n\n"
    return ExampleKind.PROMPT_COMPLETION, prompt + "### Response:", output, Markup.STRUCTURED


def _from_text(obj: dict[str, Any]) -> Example:
    kind, prompt, completion, markup = split_text(_string(obj, "text", "`text`"))
    return kind, prompt, completion, markup


def _from_chat(obj: dict[str, Any]) -> Example:
    if "messages" not in obj:
        raise Reject("MISSING_KEY", "no `messages` key; each line of this file needs `messages`")
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise Reject(
            "WRONG_TYPE", '`messages` must be a non-empty list of {"role", "content"} objects'
        )
    turns: list[str] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise Reject("WRONG_TYPE", f"messages[{i}] must be an object with `role` and `content`")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or role not in _CHAT_ROLES:
            raise Reject(
                "INVALID_ROLE",
                f"messages[{i}].role is {role!r}; use one of {', '.join(_CHAT_ROLES)}",
            )
        if not isinstance(content, str):
            raise Reject("WRONG_TYPE", f"messages[{i}].content must be a string")
        turns.append(f"### {role.capitalize()}: {content}")
    last = messages[-1]
    if last["role"] != "assistant":
        raise Reject(
            "NO_COMPLETION",
            f"the last message is from `{last['role']}`, so there is no completion to learn; end "
            "the conversation with an `assistant` message",
        )
    if not last["content"].strip():
        raise Reject("EMPTY_COMPLETION", "the last `assistant` message is empty")
    prompt = "\n\n".join([*turns[:-1], "### Assistant:"])
    return ExampleKind.PROMPT_COMPLETION, prompt, last["content"], Markup.STRUCTURED


_JSONL_READERS: dict[SourceFormat, Callable[[dict[str, Any]], Example]] = {
    SourceFormat.JSONL_PROMPT_COMPLETION: _from_prompt_completion,
    SourceFormat.JSONL_CHAT: _from_chat,
    SourceFormat.JSONL_ALPACA: _from_alpaca,
    SourceFormat.JSONL_TEXT: _from_text,
}


def _jsonl_format_of(obj: dict[str, Any]) -> SourceFormat | None:
    if "messages" in obj:
        return SourceFormat.JSONL_CHAT
    if "prompt" in obj or "completion" in obj:
        return SourceFormat.JSONL_PROMPT_COMPLETION
    if "instruction" in obj or "output" in obj:
        return SourceFormat.JSONL_ALPACA
    if "text" in obj:
        return SourceFormat.JSONL_TEXT
    return None


def _concepts(value: object, where: str) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except ValueError:
                raise Reject("INVALID_CONCEPTS", f"{where} is not a JSON list") from None
        else:
            return tuple(c.strip() for c in text.split(",") if c.strip())
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise Reject("INVALID_CONCEPTS", f"{where} must be a list of strings")
    return tuple(c for c in value if c.strip())


def _metadata(value: object, where: str) -> dict[str, str] | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise Reject(
                "INVALID_METADATA", f"{where} is not valid JSON; write it as a JSON object"
            ) from None
    if not isinstance(value, dict):
        raise Reject("INVALID_METADATA", f"{where} must be a JSON object")
    if nests_deeper(value, MAX_JSON_DEPTH):
        raise Reject(
            "INVALID_METADATA",
            f"{where} nests deeper than {MAX_JSON_DEPTH} levels; flatten it",
        )
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in value.items()} or None


# Bytes -> lines


class LineSplitter:
    """Turns byte chunks into numbered lines, in bounded memory.

    Yields `(first_line_number, lines)` per chunk, lines without their newline (CRLF and
    LF both end a line; a leading UTF-8 BOM is dropped). A line longer than
    `max_line_chars` is not accumulated: it is yielded as "" and its number put in
    `oversize_lines`. `invalid_utf8_seen` turns true once any byte was not UTF-8 (those
    bytes appear as lone surrogates in the text).
    """

    def __init__(self, chunks: Iterable[bytes], max_line_chars: int) -> None:
        self._chunks = chunks
        self.max_line_chars = max_line_chars
        self.bytes_read = 0
        self.oversize_lines: set[int] = set()
        self.invalid_utf8_seen = False

    def blocks(self) -> Iterator[tuple[int, list[str]]]:
        decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        tail = ""
        skipping = False  # inside an oversize line: drop text until its newline
        next_line = 1
        started = False
        for chunk in self._chunks:
            if not chunk:
                continue
            if not started:
                _refuse_utf16(chunk)
            self.bytes_read += len(chunk)
            text = decoder.decode(chunk)
            if not started:
                text = text.removeprefix("\ufeff")
                started = True
            if not self.invalid_utf8_seen and _SURROGATE.search(text):
                self.invalid_utf8_seen = True
            if skipping:
                newline = text.find("\n")
                if newline < 0:
                    continue
                skipping = False
                self.oversize_lines.add(next_line)
                # The oversize line stands in as an empty first line of this block.
                text = "\n" + text[newline + 1 :]
            pending = tail + text if tail else text
            if "\r" in pending:
                pending = pending.replace("\r\n", "\n")
            lines = pending.split("\n")
            tail = lines.pop()
            if len(tail) > self.max_line_chars:
                tail = ""
                skipping = True
            if lines:
                yield next_line, lines
                next_line += len(lines)
        text = decoder.decode(b"", final=True)
        if text and _SURROGATE.search(text):
            self.invalid_utf8_seen = True
        if skipping:
            self.oversize_lines.add(next_line)
            yield next_line, [""]
        elif tail or text:
            yield next_line, [(tail + text).removesuffix("\r")]


def _refuse_utf16(first_chunk: bytes) -> None:
    if first_chunk.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise invalid_field(
            FILE_FIELD,
            "the file is UTF-16 text; save it as UTF-8 (in Excel: CSV UTF-8) and upload again",
            reason="UNSUPPORTED_ENCODING",
        )


# Detection


@dataclass(frozen=True)
class Detected:
    """A detected format and, for CSV, the delimiter and header columns."""

    format: SourceFormat
    delimiter: str = ","
    columns: tuple[str, ...] = ()


def _csv_header(line: str, delimiter: str) -> tuple[str, ...]:
    try:
        row = next(csv.reader([line], delimiter=delimiter))
    except (csv.Error, StopIteration):
        return ()
    return tuple(column.strip() for column in row)


def _csv_layout(columns: tuple[str, ...]) -> SourceFormat | None:
    if PORTAL_TEXT_COLUMN in columns:
        return SourceFormat.PORTAL_CSV
    if SDK_TEXT_COLUMN in columns:
        return SourceFormat.SDK_CSV
    return None


def _find_csv_header(first_line: str) -> Detected | None:
    for delimiter in (",", "\t", ";"):
        columns = _csv_header(first_line, delimiter)
        layout = _csv_layout(columns)
        if layout is not None:
            return Detected(layout, delimiter, columns)
    return None


def _refuse(description: str, reason: str) -> InvalidArgument:
    return invalid_field(FILE_FIELD, description, reason=reason)


def _show_columns(first_line: str) -> str:
    delimiter = max((",", "\t", ";"), key=first_line.count)
    columns = _csv_header(first_line, delimiter)
    return ", ".join(f"`{c}`" for c in columns[:10]) or "none"


def detect_format(file_name: str, requested: SourceFormat | None, sample: list[str]) -> Detected:
    """Chooses the format from the request, the file's extension and its first lines.

    Raises InvalidArgument (naming the file field) when nothing in the file can be used.
    """
    nonblank = [line for line in sample if line.strip()]
    if not nonblank:
        raise _refuse("the file is empty; upload a file with at least one example", "EMPTY_FILE")
    head = "\n".join(nonblank)
    if "\x00" in head:
        raise _refuse(
            "the file is not text (it has NUL bytes); upload CSV, JSONL or plain text in UTF-8",
            "UNKNOWN_FORMAT",
        )
    if len(_SURROGATE.findall(head)) * 20 > len(head):
        raise _refuse(
            "the file is not UTF-8 text; save it as UTF-8 and upload again", "UNSUPPORTED_ENCODING"
        )
    first = nonblank[0]
    suffix = PurePosixPath(file_name.lower()).suffix
    expect_csv = requested in CSV_FORMATS or (requested is None and suffix in (".csv", ".tsv"))
    expect_jsonl = requested in JSONL_FORMATS or (
        requested is None and suffix in (".jsonl", ".ndjson", ".json")
    )

    if requested is SourceFormat.PLAIN_TEXT or (requested is None and suffix == ".txt"):
        return Detected(SourceFormat.PLAIN_TEXT)
    if expect_csv or (requested is None and not first.lstrip().startswith(("{", "["))):
        found = _find_csv_header(first)
        if found is not None:
            if requested is not None and requested is not found.format:
                want = (
                    PORTAL_TEXT_COLUMN if requested is SourceFormat.PORTAL_CSV else SDK_TEXT_COLUMN
                )
                raise _refuse(
                    f"the CSV header has no `{want}` column that this format needs (found "
                    f"{_show_columns(first)}); fix the header or leave the format to detection",
                    "WRONG_COLUMNS",
                )
            return found
        if expect_csv:
            raise _refuse(
                f"the CSV header has columns {_show_columns(first)}; expected "
                f"`{PORTAL_TEXT_COLUMN}` (portal layout) or `{SDK_TEXT_COLUMN}` (SDK layout) in "
                "the first line; rename the column that holds the examples",
                "WRONG_COLUMNS",
            )
    if expect_jsonl or first.lstrip().startswith(("{", "[")):
        if first.lstrip().startswith("["):
            raise _refuse(
                "the file is a JSON array; JSONL needs one JSON object per line", "UNKNOWN_FORMAT"
            )
        if requested in JSONL_FORMATS:
            assert requested is not None
            return Detected(requested)
        keys: set[str] = set()
        for line in nonblank:
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError):
                continue  # a bad line; the row reader reports it
            if isinstance(obj, dict):
                found_format = _jsonl_format_of(obj)
                if found_format is not None:
                    return Detected(found_format)
                keys.update(obj)
        seen = ", ".join(f"`{k}`" for k in sorted(keys)[:10]) or "no JSON objects"
        raise _refuse(
            f"the first lines are not JSONL this service knows (found {seen}); each line needs "
            "`prompt`+`completion`, `messages`, `instruction`+`output`, or `text`",
            "UNKNOWN_FORMAT",
        )
    return Detected(SourceFormat.PLAIN_TEXT)


# The parser


class UploadParser:
    """Parses one uploaded file: detection, then rows in batches.

    After `batches()` is exhausted, `detected_format`, `rows_read` and `bytes_read` hold
    the totals. `rows_read` counts rows (not header, not blank lines); every row read ends
    up in exactly one batch's `rows` or `errors`.
    """

    def __init__(
        self,
        *,
        file_name: str,
        requested: SourceFormat | None,
        max_example_chars: int,
        labels: LabelCompletions | None = None,
    ) -> None:
        self.file_name = file_name
        self.requested = requested
        self.max_example_chars = max_example_chars
        self.labels = labels
        self.detected_format: SourceFormat | None = None
        self.rows_read = 0
        self._splitter: LineSplitter | None = None

    @property
    def bytes_read(self) -> int:
        return self._splitter.bytes_read if self._splitter else 0

    def batches(self, chunks: Iterable[bytes]) -> Iterator[Batch]:
        splitter = LineSplitter(chunks, self.max_example_chars)
        self._splitter = splitter
        blocks = splitter.blocks()
        sniffed: list[tuple[int, list[str]]] = []
        sample: list[str] = []
        size = 0
        for block in blocks:
            sniffed.append(block)
            sample.extend(block[1][: SNIFF_LINES - len(sample)])
            size += sum(len(line) for line in block[1])
            if len(sample) >= SNIFF_LINES or size >= SNIFF_CHARS:
                break
        oversize_first = self._oversize_first_line(sniffed)
        try:
            detected = detect_format(self.file_name, self.requested, sample)
        except InvalidArgument:
            if oversize_first:  # what the file holds was on that line
                raise self._too_long_first_line(oversize_first) from None
            raise
        if oversize_first and detected.format in CSV_FORMATS:
            raise self._too_long_first_line(oversize_first)  # its header
        if self.labels is not None:
            _check_labelled(detected)
        self.detected_format = detected.format
        all_blocks = itertools.chain(sniffed, blocks)
        if detected.format in CSV_FORMATS:
            yield from self._csv_batches(all_blocks, detected)
        elif detected.format is SourceFormat.PLAIN_TEXT:
            yield from self._plain_batches(all_blocks)
        else:
            yield from self._jsonl_batches(all_blocks, _JSONL_READERS[detected.format])

    def _oversize_first_line(self, sniffed: list[tuple[int, list[str]]]) -> int:
        """The number of the file's first non-blank line if it was too long to keep, else 0.

        Such a line reads as blank: the file would look empty, or a CSV's first row would be
        taken for its header."""
        assert self._splitter is not None
        for first, lines in sniffed:
            for number, line in enumerate(lines, start=first):
                if number in self._splitter.oversize_lines:
                    return number
                if line.strip():
                    return 0
        return 0

    def _too_long_first_line(self, number: int) -> InvalidArgument:
        return _refuse(
            f"line {number}, the file's first, is longer than the limit of "
            f"{self.max_example_chars:,} characters on one line (max_example_chars), so it "
            "cannot be read as a CSV header or as an example; a CSV header that long has far "
            f"too many columns: keep only the columns this service reads (`{SDK_TEXT_COLUMN}`, "
            f"or `{PORTAL_TEXT_COLUMN}`, with their concepts and metadata), or shorten the "
            "line, and upload again",
            "LINE_TOO_LONG",
        )

    def _blank(self, line_number: int, batch: Batch) -> None:
        """A blank line is skipped, unless it stands for a line too long to keep."""
        assert self._splitter is not None
        if line_number in self._splitter.oversize_lines:
            self.rows_read += 1
            batch.errors.append(
                _row_error(line_number, _too_long(None, self.max_example_chars), "")
            )

    def _jsonl_batches(
        self, blocks: Iterable[tuple[int, list[str]]], reader: Callable[[dict[str, Any]], Example]
    ) -> Iterator[Batch]:
        assert self._splitter is not None
        limit = self.max_example_chars
        loads = json.JSONDecoder().decode
        for first, lines in blocks:
            batch = Batch()
            rows, errors = batch.rows, batch.errors
            check_utf8 = self._splitter.invalid_utf8_seen
            number = first - 1
            for line in lines:
                number += 1
                if not line or line.isspace():
                    self._blank(number, batch)
                    continue
                self.rows_read += 1
                try:
                    if len(line) > limit:
                        raise _too_long(len(line), limit)
                    if check_utf8 and _SURROGATE.search(line):
                        raise _invalid_utf8(line)
                    try:
                        obj = loads(line)
                    except RecursionError:
                        raise Reject(
                            "INVALID_JSON",
                            "the line nests arrays or objects too deeply to read; flatten it",
                        ) from None
                    except ValueError as exc:
                        detail = (
                            f"{exc.msg} at character {exc.colno}"
                            if isinstance(exc, json.JSONDecodeError)
                            else str(exc)
                        )
                        raise Reject(
                            "INVALID_JSON",
                            f"not valid JSON ({detail}); each line must be one JSON object",
                        ) from None
                    if type(obj) is not dict:
                        raise Reject(
                            "NOT_AN_OBJECT",
                            f"the line is {_json_type(obj)}, not a JSON object; each line must be "
                            "one JSON object",
                        )
                    kind, prompt, completion, markup = reader(obj)
                    _refuse_nul(prompt + completion)
                    concepts = _concepts(obj["concepts"], "`concepts`") if "concepts" in obj else ()
                    metadata = (
                        _metadata(obj["metadata"], "`metadata`") if "metadata" in obj else None
                    )
                except Reject as err:
                    errors.append(_row_error(number, err, line))
                    continue
                rows.append(
                    ParsedRow(number, kind, prompt, completion, line, markup, concepts, metadata)
                )
            yield batch

    def _plain_batches(self, blocks: Iterable[tuple[int, list[str]]]) -> Iterator[Batch]:
        assert self._splitter is not None
        limit = self.max_example_chars
        for first, lines in blocks:
            batch = Batch()
            check_utf8 = self._splitter.invalid_utf8_seen
            number = first - 1
            for line in lines:
                number += 1
                if not line or line.isspace():
                    self._blank(number, batch)
                    continue
                self.rows_read += 1
                try:
                    if len(line) > limit:
                        raise _too_long(len(line), limit)
                    if check_utf8 and _SURROGATE.search(line):
                        raise _invalid_utf8(line)
                    _refuse_nul(line)
                    kind, prompt, completion, markup = split_text(line)
                except Reject as err:
                    batch.errors.append(_row_error(number, err, line))
                    continue
                batch.rows.append(
                    ParsedRow(number, kind, prompt, completion, line, markup, (), None)
                )
            yield batch

    def _csv_batches(
        self, blocks: Iterable[tuple[int, list[str]]], detected: Detected
    ) -> Iterator[Batch]:
        splitter = self._splitter
        assert splitter is not None
        limit = self.max_example_chars
        if csv.field_size_limit() < limit + 1:
            csv.field_size_limit(limit + 1)
        lines = (line + "\n" for _, block in blocks for line in block)
        reader = csv.reader(lines, delimiter=detected.delimiter)
        columns: tuple[str, ...] = ()
        last_line = 0
        batch = Batch()
        batch_start = 0
        while True:
            start = last_line + 1
            try:
                record = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                last_line = reader.line_num
                if not columns:
                    raise _refuse(
                        f"the CSV header cannot be read ({exc})", "WRONG_COLUMNS"
                    ) from None
                self.rows_read += 1
                reject = (
                    _too_long(None, limit)
                    if "field larger than field limit" in str(exc)
                    else Reject(
                        "MALFORMED_CSV", f"the CSV row cannot be read ({exc}); check its quotes"
                    )
                )
                batch.errors.append(_row_error(start, reject, ""))
                continue
            last_line = reader.line_num
            if not record:
                for number in range(start, last_line + 1):
                    self._blank(number, batch)
                continue
            if not columns:
                if len(record) > MAX_CSV_COLUMNS:
                    raise _refuse(
                        f"the CSV header has {len(record):,} columns, more than the "
                        f"{MAX_CSV_COLUMNS:,} this service reads; keep only the columns it "
                        f"reads (`{SDK_TEXT_COLUMN}`, or `{PORTAL_TEXT_COLUMN}`, with their "
                        "concepts and metadata) and upload again",
                        "TOO_MANY_COLUMNS",
                    )
                columns = tuple(column.strip() for column in record)
                continue
            self.rows_read += 1
            try:
                if splitter.oversize_lines and any(
                    n in splitter.oversize_lines for n in range(start, last_line + 1)
                ):
                    raise _too_long(None, limit)
                row = self._csv_row(start, record, columns, detected.format)
            except Reject as err:
                batch.errors.append(
                    _row_error(start, err, _record_excerpt(record, columns, detected))
                )
            else:
                batch.rows.append(row)
            if (
                len(batch.rows) + len(batch.errors) >= CSV_BATCH_ROWS
                or splitter.bytes_read - batch_start >= CSV_BATCH_BYTES
            ):
                yield batch
                batch = Batch()
                batch_start = splitter.bytes_read
        if not columns:
            raise _refuse(
                "the file is empty; upload a file with at least one example", "EMPTY_FILE"
            )
        yield batch

    def _csv_row(
        self, line: int, record: list[str], columns: tuple[str, ...], layout: SourceFormat
    ) -> ParsedRow:
        assert self._splitter is not None
        values = dict(zip(columns, record, strict=False))
        if len(record) > len(columns) and any(v.strip() for v in record[len(columns) :]):
            raise Reject(
                "MALFORMED_CSV",
                f"the row has {len(record)} fields but the header has {len(columns)}; put a text "
                "that contains the separator in double quotes",
            )
        text_column = PORTAL_TEXT_COLUMN if layout is SourceFormat.PORTAL_CSV else SDK_TEXT_COLUMN
        text = values.get(text_column)
        if text is None:
            raise Reject(
                "MISSING_COLUMN",
                f"the row has {len(record)} field(s) and no `{text_column}` value; it needs one "
                "field per header column",
            )
        if not text.strip():
            raise Reject("EMPTY_TEXT", f"the `{text_column}` cell is empty")
        if len(text) > self.max_example_chars:
            raise _too_long(len(text), self.max_example_chars)
        if self._splitter.invalid_utf8_seen and any(_SURROGATE.search(v) for v in record):
            raise _invalid_utf8(text)
        _refuse_nul(text)
        example = split_text(text) if self.labels is None else None
        if layout is SourceFormat.PORTAL_CSV:
            concepts_column = PORTAL_CONCEPTS_COLUMN
            metadata = _metadata(values.get(PORTAL_METADATA_COLUMN), f"`{PORTAL_METADATA_COLUMN}`")
            external_id = values.get(PORTAL_ID_COLUMN, "").strip()
        else:
            concepts_column = SDK_CONCEPTS_COLUMN
            metadata = _metadata(values.get("metadata"), "`metadata`")
            external_id = values.get("inputid", "").strip()
        concepts = _concepts(values.get(concepts_column), f"`{concepts_column}`")
        if example is None:
            assert self.labels is not None
            example = self.labels.example(text, concepts, concepts_column, self.max_example_chars)
        kind, prompt, completion, markup = example
        if external_id:
            metadata = {**(metadata or {}), "inputid": external_id}
        return ParsedRow(line, kind, prompt, completion, text, markup, concepts, metadata)


def _check_labelled(detected: Detected) -> None:
    """Refuses, for label completions, a file that is no CSV with a text and a concepts column."""
    field = "header.label_completions"
    if detected.format not in CSV_FORMATS:
        raise invalid_field(
            field,
            f"labels as completions need a labelled CSV (an `{SDK_TEXT_COLUMN}` and a "
            f"`{SDK_CONCEPTS_COLUMN}` column, or the portal's `{PORTAL_TEXT_COLUMN}` and "
            f"`{PORTAL_CONCEPTS_COLUMN}`), but this file is {detected.format.name}; upload "
            "such a CSV, or this file without label_completions",
            reason="LABELS_NEED_CSV",
        )
    wanted = (
        PORTAL_CONCEPTS_COLUMN
        if detected.format is SourceFormat.PORTAL_CSV
        else SDK_CONCEPTS_COLUMN
    )
    if wanted not in detected.columns:
        shown = ", ".join(f"`{c}`" for c in detected.columns[:10])
        raise invalid_field(
            field,
            f"the CSV header has no `{wanted}` column (found {shown}), so there are no labels "
            "to learn as completions; add the column, or upload without label_completions",
            reason="NO_CONCEPTS_COLUMN",
        )


def _record_excerpt(record: list[str], columns: tuple[str, ...], detected: Detected) -> str:
    text_column = (
        PORTAL_TEXT_COLUMN if detected.format is SourceFormat.PORTAL_CSV else SDK_TEXT_COLUMN
    )
    if text_column in columns and columns.index(text_column) < len(record):
        return record[columns.index(text_column)]
    return detected.delimiter.join(record)
