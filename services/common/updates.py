"""Partial updates: field masks (AIP-134) and etags (AIP-154), the same for every service.

An update changes only the fields its mask names (or, without a mask, the updatable
fields the request sets). Given the etag its caller read, it changes the resource only if
the resource still has that etag; a stale one is Aborted, with the current etag in the
error's metadata, so the caller reads again and reapplies its change.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

from google.protobuf.message import Message

from loraforge.services.common.errors import Aborted, invalid_field


def etag(*identity_and_fields: object, weak: bool = False) -> str:
    """A checksum of a resource's fields, quoted as RFC 7232 has it (AIP-154).

    Given the resource's identity too (its ids and create time), so the etag of a deleted
    resource never matches one created again under the same name. `weak` (a `W/` prefix)
    when the checksum leaves out fields that change on their own, such as counts.
    """
    key = json.dumps(identity_and_fields, ensure_ascii=False, separators=(",", ":"))
    digest = hashlib.blake2b(key.encode(), digest_size=12).hexdigest()
    return f'W/"{digest}"' if weak else f'"{digest}"'


def update_paths(
    resource: Message, mask_set: bool, paths: Sequence[str], updatable: Sequence[str]
) -> set[str]:
    """The fields an update changes, or InvalidArgument naming a mask path it cannot.

    `mask_set`: whether the request has an `update_mask`. Without one (or with an empty
    one), the updatable fields the request sets; `*` alone: every updatable field.
    """
    if not mask_set or not paths:
        return {f for f in updatable if _is_set(resource, f)}
    if list(paths) == ["*"]:
        return set(updatable)
    kind = resource.DESCRIPTOR.name
    known = {f.name for f in resource.DESCRIPTOR.fields}
    changeable = ", ".join(f"`{f}`" for f in updatable)
    for path in paths:
        if path == "*":
            problem = (
                f"`*` must be the only path when it is given; or name the fields ({changeable})"
            )
        elif path in updatable:
            continue
        elif path in known:
            problem = f"`{path}` cannot be changed; the fields an update changes are {changeable}"
        else:
            problem = (
                f"`{path}` is not a field of {kind}; the fields an update changes are {changeable}"
            )
        raise invalid_field("update_mask", problem, reason="INVALID_UPDATE_MASK")
    return set(paths)


def _is_set(resource: Message, field: str) -> bool:
    try:
        return resource.HasField(field)  # a message field, or a scalar with presence
    except ValueError:  # a plain scalar or a repeated field: set when not empty
        return bool(getattr(resource, field))


def check_etag(name: str, given: str, current: str) -> None:
    """Aborted when `given` (the etag a caller read) is set and is not `current`."""
    if given and given != current:
        raise Aborted(
            f"{name} has changed since etag {given!r} was read (it is now {current!r}); get it "
            "again, reapply your change and send the new etag",
            reason="ETAG_MISMATCH",
            metadata={"etag": current},
        )


def changed_meanwhile(name: str) -> Aborted:
    """The error of an update whose compare-and-set found the resource changed under it."""
    return Aborted(
        f"{name} was changed by another update while this one ran; get it again, reapply "
        "your change and send the new etag",
        reason="ETAG_MISMATCH",
    )
