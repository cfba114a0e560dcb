"""The dataset service's domain types: what an example is, where it came from, and the records
the store returns. No gRPC here; the servicer maps these to and from protobuf by name.

Enum values equal the protobuf numbers of the same names (`SourceFormat.PORTAL_CSV` is
`SOURCE_FORMAT_PORTAL_CSV = 1`, `Markup.NONE` is `TEXT_MARKUP_NONE = 1`). The metadata
store holds the numbers, snapshots and version stats hold the names, so neither may ever
change meaning.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from loraforge.services.common.updates import etag


class ExampleKind(enum.IntEnum):
    """A (prompt, completion) pair, or a plain text learned whole."""

    PROMPT_COMPLETION = 1
    TEXT = 2


class SourceFormat(enum.IntEnum):
    """The format an example came from."""

    PORTAL_CSV = 1
    SDK_CSV = 2
    JSONL_PROMPT_COMPLETION = 3
    JSONL_CHAT = 4
    JSONL_ALPACA = 5
    JSONL_TEXT = 6
    PLAIN_TEXT = 7
    STRUCTURED = 8


class Markup(enum.IntEnum):
    """How a raw text marked its prompt and completion."""

    NONE = 1
    INSTRUCTION_HUMAN_ASSISTANT = 2
    INSTRUCTION_INPUT_RESPONSE = 3
    LLAMA3_HEADERS = 4
    STRUCTURED = 5
    LABEL_COMPLETION = 6  # concepts as the completion, the input in an instruction template


class VersionState(enum.IntEnum):
    """Life of a dataset version; `status_code` is the seed platform's number for it."""

    PENDING = 1
    IN_PROGRESS = 2
    READY = 3
    FAILED = 4

    @property
    def status_code(self) -> int:
        return _STATUS_CODES[self]


_STATUS_CODES = {
    VersionState.PENDING: 64005,
    VersionState.IN_PROGRESS: 64010,
    VersionState.READY: 64015,
    VersionState.FAILED: 64020,
}


@dataclass(frozen=True)
class AppRecord:
    app_id: str
    description: str
    create_time: float

    @property
    def etag(self) -> str:
        return etag("app", self.app_id, self.create_time, self.description)


@dataclass(frozen=True)
class DatasetRecord:
    app_id: str
    dataset_id: str
    description: str
    create_time: float
    input_count: int
    version_count: int

    @property
    def etag(self) -> str:
        """Weak: over what UpdateDataset can change; uploads and versions leave it as it is."""
        return etag(
            "dataset", self.app_id, self.dataset_id, self.create_time, self.description, weak=True
        )


@dataclass(frozen=True)
class InputRecord:
    """One stored example and its provenance."""

    input_id: int
    kind: ExampleKind
    prompt: str
    completion: str
    raw: str
    source_format: SourceFormat
    markup: Markup
    source_line: int
    upload_id: str
    concepts: tuple[str, ...]
    metadata: dict[str, str]
    create_time: float


@dataclass(frozen=True)
class NewExample:
    """An example a client sends directly (AddInputs), already validated."""

    kind: ExampleKind
    prompt: str
    completion: str
    raw: str
    concepts: tuple[str, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class LengthStats:
    min: int
    median: int
    p95: int
    max: int


@dataclass(frozen=True)
class VersionStats:
    example_count: int
    prompt_chars: LengthStats
    completion_chars: LengthStats
    examples_by_format: dict[str, int]
    examples_by_kind: dict[str, int]
    snapshot_bytes: int


@dataclass(frozen=True)
class VersionRecord:
    app_id: str
    dataset_id: str
    version_id: str
    description: str
    state: VersionState
    failure_reason: str
    stats: VersionStats | None
    content_sha256: str
    snapshot_key: str
    referenced_by: tuple[str, ...]
    create_time: float


@dataclass(frozen=True)
class RowError:
    """A row of an upload that was not stored: where it starts, why, and how it began."""

    line: int
    code: str
    reason: str
    excerpt: str


@dataclass
class UploadReport:
    """What an upload did; `row_errors` holds the first `max_row_errors` of `rows_rejected`."""

    upload_id: str
    detected_format: SourceFormat
    rows_read: int = 0
    rows_accepted: int = 0
    rows_rejected: int = 0
    duplicate_rows: int = 0
    row_errors: list[RowError] = field(default_factory=list)
    row_errors_truncated: bool = False
    bytes_read: int = 0
    rows_by_markup: dict[str, int] = field(default_factory=dict)
