"""Typed domain errors.

Domain code raises these and knows nothing of gRPC; the server's error
interceptor (`loraforge.services.common.interceptor`) turns each into a status
code with `google.rpc` details. Messages are for people: say what was wrong and
what to do.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# Most field violations one error carries: a request with thousands of bad elements gets the
# first ones and a count of the rest, so its error still fits a response's headers.
MAX_FIELD_VIOLATIONS = 20


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request: `field` is a dot path, e.g. `param_overrides.peft_config.r`."""

    field: str
    description: str


def bounded_violations(
    violations: Iterable[FieldViolation], limit: int = MAX_FIELD_VIOLATIONS
) -> tuple[FieldViolation, ...]:
    """The first `limit` violations, then (if there were more) one saying how many more."""
    kept: list[FieldViolation] = []
    more = 0
    for violation in violations:
        if len(kept) < limit:
            kept.append(violation)
        else:
            more += 1
    if more:
        kept.append(
            FieldViolation(
                "",
                f"and {more} more problem{'s' if more > 1 else ''} like these; "
                "fix these and send the request again to see the rest",
            )
        )
    return tuple(kept)


def summarize(violations: Sequence[FieldViolation], limit: int = MAX_FIELD_VIOLATIONS) -> str:
    """A message naming the first few violations (`field: description; …`) and how many more."""
    shown = [f"{v.field}: {v.description}" if v.field else v.description for v in violations]
    head = "; ".join(shown[:limit])
    rest = len(shown) - limit
    return f"{head}; and {rest} more" if rest > 0 else head


class LoraforgeError(Exception):
    """Base of all errors a client is meant to see.

    `reason` is a machine-readable UPPER_SNAKE cause (sent as `ErrorInfo.reason`);
    `metadata` adds string facts to the `ErrorInfo`.
    """

    default_reason = "ERROR"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        field_violations: Iterable[FieldViolation] = (),
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.field_violations = bounded_violations(field_violations)
        self.metadata = dict(metadata or {})


class InvalidArgument(LoraforgeError):
    """The request itself is wrong (bad field, bad file); retrying it unchanged fails again."""

    default_reason = "INVALID_ARGUMENT"


class NotFound(LoraforgeError):
    """A named resource does not exist."""

    default_reason = "NOT_FOUND"


class AlreadyExists(LoraforgeError):
    """A resource with this name already exists."""

    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(LoraforgeError):
    """The system is not in a state that allows this (e.g. not trained yet, still referenced)."""

    default_reason = "FAILED_PRECONDITION"


class Unavailable(LoraforgeError):
    """A dependency is not ready or reachable; retrying later may succeed."""

    default_reason = "UNAVAILABLE"


# ErrorInfo metadata key of a ResourceExhausted whose limit passes (a rate or a load): how
# many seconds to wait before retrying. HTTP faces answer only such a refusal with 429 and
# Retry-After; a limit without it stays until something changes, so retrying cannot help.
RETRY_AFTER_SECONDS = "retry_after_seconds"


class ResourceExhausted(LoraforgeError):
    """A limit was hit (size, count, capacity); `RETRY_AFTER_SECONDS` in `metadata` marks
    one that passes with time."""

    default_reason = "RESOURCE_EXHAUSTED"


class DataLoss(LoraforgeError):
    """Stored data is damaged or gone (a storage fault, not the caller's mistake); retrying
    the same request fails again, so the message says what to do instead."""

    default_reason = "DATA_LOSS"


class Aborted(LoraforgeError):
    """A concurrent change conflicted with this one; retry the whole operation."""

    default_reason = "ABORTED"


class Unauthenticated(LoraforgeError):
    """The call carries no valid credential (no key, or one unknown, revoked or expired)."""

    default_reason = "UNAUTHENTICATED"


class PermissionDenied(LoraforgeError):
    """The caller's credential does not allow this call on this resource."""

    default_reason = "PERMISSION_DENIED"


def invalid_field(
    field: str, description: str, *, reason: str = "INVALID_FIELD"
) -> InvalidArgument:
    """An InvalidArgument for one bad field, with the field path in message and details."""
    return InvalidArgument(
        f"{field}: {description}",
        reason=reason,
        field_violations=[FieldViolation(field, description)],
    )
