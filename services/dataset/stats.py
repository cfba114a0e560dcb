"""Version stats: counted while a snapshot is written, stored as JSON in the version row."""

from __future__ import annotations

import math
from array import array
from collections import Counter
from typing import Any

from loraforge.services.dataset.domain import ExampleKind, LengthStats, SourceFormat, VersionStats


def length_stats(lengths: array[int]) -> LengthStats:
    """Min, median, 95th percentile (nearest rank) and max."""
    if not lengths:
        return LengthStats(0, 0, 0, 0)
    ordered = sorted(lengths)
    n = len(ordered)
    return LengthStats(
        min=ordered[0],
        median=ordered[(n - 1) // 2],
        p95=ordered[max(0, math.ceil(0.95 * n) - 1)],
        max=ordered[-1],
    )


class StatsCounter:
    """Counts the examples of a snapshot as they are written, in bounded memory per example."""

    def __init__(self) -> None:
        self._prompt_lengths: array[int] = array("q")
        self._completion_lengths: array[int] = array("q")
        self._by_format: Counter[str] = Counter()
        self._by_kind: Counter[str] = Counter()

    @property
    def count(self) -> int:
        return len(self._prompt_lengths)

    def add(self, row: Any) -> None:
        """Counts one `inputs` row."""
        self._prompt_lengths.append(len(row.prompt))
        self._completion_lengths.append(len(row.completion))
        self._by_format[SourceFormat(row.source_format).name] += 1
        self._by_kind[ExampleKind(row.kind).name] += 1

    def stats(self, snapshot_bytes: int) -> VersionStats:
        return VersionStats(
            example_count=self.count,
            prompt_chars=length_stats(self._prompt_lengths),
            completion_chars=length_stats(self._completion_lengths),
            examples_by_format=dict(self._by_format),
            examples_by_kind=dict(self._by_kind),
            snapshot_bytes=snapshot_bytes,
        )


def stats_to_json(stats: VersionStats) -> dict[str, Any]:
    def lengths(s: LengthStats) -> list[int]:
        return [s.min, s.median, s.p95, s.max]

    return {
        "example_count": stats.example_count,
        "prompt_chars": lengths(stats.prompt_chars),
        "completion_chars": lengths(stats.completion_chars),
        "examples_by_format": stats.examples_by_format,
        "examples_by_kind": stats.examples_by_kind,
        "snapshot_bytes": stats.snapshot_bytes,
    }


def stats_from_json(data: dict[str, Any]) -> VersionStats:
    return VersionStats(
        example_count=data["example_count"],
        prompt_chars=LengthStats(*data["prompt_chars"]),
        completion_chars=LengthStats(*data["completion_chars"]),
        examples_by_format=data["examples_by_format"],
        examples_by_kind=data["examples_by_kind"],
        snapshot_bytes=data["snapshot_bytes"],
    )
