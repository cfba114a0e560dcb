"""Typed domain errors.

Domain code raises these and knows nothing of gRPC; the server's error
interceptor (`loraforge.services.common.interceptor`) turns each into a status
code with `google.rpc` details. Messages are for people: say what was wrong and
what to do.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request: `field` is a dot path, e.g. `param_overrides.peft_config.r`."""

    field: str
    description: str


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
        self.field_violations = tuple(field_violations)
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


class ResourceExhausted(LoraforgeError):
    """A limit was hit (size, count, capacity)."""

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
