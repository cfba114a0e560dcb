"""API keys: who a caller is (authentication) and what it may do (authorization).

Every RPC of every service, except health and reflection, takes
`authorization: Bearer <key>` metadata. A key is one of:

- an **admin key**: no app, scope `admin`; creates apps and keys and may do everything;
- an **app key**: some of the scopes `read`, `write`, `train`, `predict` on one app;
- a **service identity** (`trainer`, `worker`, `predictor`): a pre-shared key of one of the
  services, accepted only by the internal RPCs that service calls (`POLICY` lists them).

Keys look like `lf_{id}_{secret}` (`id`: 12 hex digits, shown as the prefix `lf_{id}`;
`secret`: 32 random bytes). Stores keep only the SHA-256 of the whole key: with that much
randomness a fast hash is enough (a slow password hash guards guessable secrets).

The dataset service owns keys (it owns apps, and an app key belongs to an app); the other
services ask it through `AuthService.VerifyApiKey` and remember the answer for
`auth_cache_seconds`, so a Predict pays no round trip once its key is known. A revoked
key stops working there within that time.

`POLICY` says, for each RPC, which scope on which app a request needs: the app comes
from the request's resource names, so permission is checked before existence (a key of
app A asking about app B gets PERMISSION_DENIED whether or not the resource exists). An
RPC missing from `POLICY` is refused, never let through (`tests/test_auth.py` checks that
every RPC of every service has an entry).
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import inspect
import ipaddress
import os
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc

from loraforge.services.common.errors import (
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
    invalid_field,
)
from loraforge.services.common.resources import ID_PATTERN
from loraforge.services.common.rpc import Context

ADMIN = "admin"
READ = "read"
WRITE = "write"
TRAIN = "train"
PREDICT = "predict"
APP_SCOPES = (READ, WRITE, TRAIN, PREDICT)
SERVICES = ("trainer", "worker", "predictor")
# A request that names no app (a global list) is allowed to any key holding the scope.
ANY_APP = "*"
# Services whose RPCs need no key: health checks and reflection.
OPEN_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)

KEY_PATTERN = re.compile(r"^lf_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
# Pre-shared service keys need not follow the key format, but must be long enough.
MIN_SERVICE_KEY_CHARS = 32
HINT = (
    "send `authorization: Bearer <key>` metadata; `loraforge up` writes an admin key to "
    "~/.loraforge/admin.key, and `loraforge keys create` makes app keys"
)


def new_api_key() -> tuple[str, str]:
    """A fresh key: its id and the whole key `lf_{id}_{secret}`."""
    key_id = secrets.token_hex(6)
    return key_id, f"lf_{key_id}_{secrets.token_urlsafe(32)}"


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_id_of(key: str) -> str | None:
    """The id of a well-formed key; None for anything else."""
    match = KEY_PATTERN.match(key)
    return match.group(1) if match else None


def write_secret_file(path: Path, text: str) -> None:
    """Writes `text` to `path`, readable by its owner only (its folder too, if made here),
    through a temporary file, so a reader never sees a partial key."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    tmp.replace(path)


def same_hash(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


@dataclass(frozen=True)
class Principal:
    """Who a verified key is and what it may do."""

    name: str  # `apiKeys/{id}` or `services/{service}`
    app: str = ""  # app id of an app key
    scopes: frozenset[str] = frozenset()
    service: str = ""
    expire_time: float | None = None

    @property
    def is_admin(self) -> bool:
        return ADMIN in self.scopes

    def allows(self, scope: str, app: str) -> bool:
        """Whether this key may use `scope` on `app` (`ANY_APP`: on some app)."""
        if self.is_admin:
            return True
        if self.service or scope == ADMIN or scope not in self.scopes:
            return False
        return app in (ANY_APP, self.app)

    def describe(self) -> str:
        if self.service:
            return f"the {self.service} service identity"
        if self.is_admin:
            return f"admin key {self.name}"
        return f"key {self.name} of app `apps/{self.app}` (scopes {', '.join(sorted(self.scopes))})"


# The principal of the call being served; None where auth is off.
_CURRENT: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "loraforge_principal", default=None
)


def current_principal() -> Principal | None:
    """The caller of the RPC being served (None when the server runs with auth off)."""
    return _CURRENT.get()


def visible_app() -> str | None:
    """The one app a list may show to the current caller; None: every app."""
    principal = current_principal()
    if principal is None or principal.is_admin or principal.service:
        return None
    return principal.app


# Rules


Need = tuple[str, str]  # (scope, app id or ANY_APP)


@dataclass(frozen=True)
class Rule:
    """What an RPC needs: `needs(request)` lists (scope, app) pairs a user key must hold;
    `services` are the service identities that may call it; `users`: whether keys other
    than service identities may call it at all."""

    needs: Callable[[Any], Sequence[Need]]
    services: frozenset[str] = frozenset()
    users: bool = True
    # Scopes that also meet a need for another (`{READ: (PREDICT,)}`: a list of what a
    # predict-only key may call).
    alternatives: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def check(self, principal: Principal, request: Any, method: str) -> None:
        short = method.rsplit("/", 1)[-1]
        if principal.service:
            if principal.service in self.services:
                return
            raise PermissionDenied(
                f"{short} is not open to {principal.describe()}", reason="SERVICE_NOT_ALLOWED"
            )
        if not self.users:
            owners = " and ".join(sorted(self.services)) or "no"
            raise PermissionDenied(
                f"{short} is internal: only the {owners} service may call it",
                reason="INTERNAL_RPC",
            )
        for scope, app in self.needs(request):
            if principal.allows(scope, app) or any(
                principal.allows(other, app) for other in self.alternatives.get(scope, ())
            ):
                continue
            if scope == ADMIN:
                raise PermissionDenied(
                    f"{short} needs an admin key; {principal.describe()} is not one",
                    reason="ADMIN_REQUIRED",
                )
            where = "any app" if app == ANY_APP else f"`apps/{app}`"
            named = " or ".join(f"`{s}`" for s in (scope, *self.alternatives.get(scope, ())))
            raise PermissionDenied(
                f"{short} needs the {named} scope on {where}; {principal.describe()} "
                "does not have it",
                reason="SCOPE_MISSING",
                metadata={"scope": scope, "app": "" if app == ANY_APP else app},
            )


def _field(request: Any, path: str) -> Any:
    value = request
    for part in path.split("."):
        value = getattr(value, part)
    return value


def app_in(name: str, path: str) -> str:
    """The app id of resource name `name` (`apps/{app}/…`), read from request field `path`.

    INVALID_ARGUMENT for a name that names no app, so nothing past this check sees it.
    """
    parts = name.split("/")
    if len(parts) >= 2 and parts[0] == "apps" and ID_PATTERN.match(parts[1]):
        return parts[1]
    if not name:
        raise invalid_field(path, "is required (a name like `apps/{app}/…`)", reason="MISSING_NAME")
    raise invalid_field(
        path, f"{name!r} is not a name like `apps/{{app}}/…`", reason="INVALID_NAME"
    )


@dataclass(frozen=True)
class On:
    """Needs `scope` on the app of each named request field (`paths`, dotted)."""

    scope: str
    paths: tuple[str, ...]

    def __call__(self, request: Any) -> Sequence[Need]:
        found = []
        for path in self.paths:
            value = _field(request, path)
            found.append((self.scope, app_in(value if isinstance(value, str) else "", path)))
        return found


def on(scope: str, *paths: str) -> On:
    return On(scope, paths)


def anywhere(scope: str) -> Callable[[Any], Sequence[Need]]:
    """Needs `scope` on some app (a list that shows each caller only its own app)."""
    return lambda _request: [(scope, ANY_APP)]


def nothing(_request: Any) -> Sequence[Need]:
    """Any valid key."""
    return ()


def rule(
    needs: Callable[[Any], Sequence[Need]],
    *,
    services: Iterable[str] = (),
    users: bool = True,
    alternatives: Mapping[str, tuple[str, ...]] | None = None,
) -> Rule:
    return Rule(needs, frozenset(services), users, dict(alternatives or {}))


def internal(*services: str) -> Rule:
    return Rule(nothing, frozenset(services), users=False)


# Verification


class Verifier(Protocol):
    """Turns a key into its principal; Unauthenticated when it is not a valid key."""

    async def verify(self, key: str) -> Principal: ...


@dataclass
class _Entry:
    principal: Principal | None
    until: float


@dataclass
class CachingVerifier:
    """Remembers what `lookup` said about each key for `ttl` seconds (a refusal for less).

    Entries are keyed by the key's hash and never outlive the key's own expiry; at most
    `max_entries` are kept, the least recently used dropped first.
    """

    lookup: Callable[[str], Awaitable[Principal]]
    ttl: float
    negative_ttl: float = 2.0
    max_entries: int = 10_000
    clock: Callable[[], float] = time.monotonic
    wall: Callable[[], float] = time.time
    _entries: OrderedDict[str, _Entry] = field(default_factory=OrderedDict)

    async def verify(self, key: str) -> Principal:
        digest = key_hash(key)
        now = self.clock()
        entry = self._entries.get(digest)
        if entry is not None and entry.until > now:
            self._entries.move_to_end(digest)
            if entry.principal is None:
                raise unknown_key()
            if entry.principal.expire_time is None or entry.principal.expire_time > self.wall():
                return entry.principal
            raise unknown_key()
        try:
            principal = await self.lookup(key)
        except Unauthenticated:
            self._remember(digest, None, now + min(self.ttl, self.negative_ttl))
            raise
        until = now + self.ttl
        if principal.expire_time is not None:
            left = principal.expire_time - self.wall()
            if left <= 0:  # expired by this machine's clock
                raise unknown_key()
            until = min(until, now + left)
        self._remember(digest, principal, until)
        return principal

    def forget(self) -> None:
        """Drops every entry (after a revocation in this process)."""
        self._entries.clear()

    def _remember(self, digest: str, principal: Principal | None, until: float) -> None:
        if self.ttl <= 0:
            return
        self._entries[digest] = _Entry(principal, until)
        self._entries.move_to_end(digest)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


def unknown_key() -> Unauthenticated:
    return Unauthenticated(
        "the API key is not valid: unknown, revoked or expired; ask an admin for a new one "
        "(`loraforge keys create`)",
        reason="INVALID_API_KEY",
    )


def bearer_key(metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
    """The key of `authorization: Bearer <key>`; Unauthenticated when missing or malformed."""
    values = [v for k, v in (metadata or ()) if k.lower() == "authorization"]
    if not values:
        raise Unauthenticated(f"this call needs an API key: {HINT}", reason="MISSING_API_KEY")
    value = values[0]
    text = value.decode(errors="replace") if isinstance(value, bytes) else value
    scheme, _, key = text.strip().partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthenticated(
            "the authorization metadata must be `Bearer <key>`", reason="MALFORMED_AUTHORIZATION"
        )
    return key.strip()


def parse_service_keys(text: str, source: str) -> dict[str, str]:
    """`name=KEY` pairs (comma- or newline-separated, `#` comments) → {key hash: service}."""
    found: dict[str, str] = {}
    for raw in re.split(r"[,\n]", text):
        entry = raw.split("#", 1)[0].strip()
        if not entry:
            continue
        name, sep, key = entry.partition("=")
        name, key = name.strip(), key.strip()
        if not sep or name not in SERVICES:
            raise InvalidArgument(
                f"{source}: {entry.split('=', 1)[0]!r} is not `service=KEY` for a service among "
                f"{', '.join(SERVICES)}"
            )
        if len(key) < MIN_SERVICE_KEY_CHARS:
            raise InvalidArgument(
                f"{source}: the key of {name} is shorter than {MIN_SERVICE_KEY_CHARS} characters; "
                "use a random one (`python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
            )
        found[key_hash(key)] = name
    return found


def is_loopback(host: str) -> bool:
    """Whether `host` is only reachable from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# The server side: an interceptor that authenticates every call and applies POLICY.


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Verifies each call's key and checks the RPC's rule before the servicer runs.

    Installed after `ErrorMappingInterceptor`, so its refusals become status codes with
    details like any other error. Requests that stream in are checked on their first
    message (the one that names the resource).
    """

    def __init__(self, verifier: Verifier, policy: Mapping[str, Rule]) -> None:
        self.verifier = verifier
        self.policy = policy

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.split("/")[1] in OPEN_SERVICES:
            return handler
        metadata = handler_call_details.invocation_metadata
        rule_ = self.policy.get(method)
        authorize = self._authorizer(method, rule_, metadata)
        common = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _unary(handler.unary_unary, authorize, streaming_in=False), **common
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _unary(handler.stream_unary, authorize, streaming_in=True), **common
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _stream(handler.unary_stream, authorize, streaming_in=False), **common
            )
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                _stream(handler.stream_stream, authorize, streaming_in=True), **common
            )
        return handler

    def _authorizer(
        self,
        method: str,
        rule_: Rule | None,
        metadata: Sequence[tuple[str, str | bytes]] | None,
    ) -> Callable[[Any], Awaitable[Principal]]:
        async def authorize(request: Any) -> Principal:
            principal = await self.verifier.verify(bearer_key(metadata))
            if rule_ is None:
                raise PermissionDenied(
                    f"{method} has no access rule on this server, so no key may call it",
                    reason="NO_ACCESS_RULE",
                )
            rule_.check(principal, request, method)
            return principal

        return authorize


async def _first_and_rest(
    messages: AsyncIterator[Any],
) -> tuple[Any | None, AsyncIterator[Any]]:
    it = messages.__aiter__()
    first = await anext(it, None)

    async def chained() -> AsyncIterator[Any]:
        if first is None:
            return
        yield first
        async for message in it:
            yield message

    return first, chained()


class _EmptyRequest:
    """What a rule sees for a request stream that ended before its first message."""

    def __getattr__(self, name: str) -> Any:
        return self


def _unary(
    behavior: Callable[..., Any],
    authorize: Callable[[Any], Awaitable[Principal]],
    *,
    streaming_in: bool,
) -> Callable[..., Awaitable[Any]]:
    async def wrapper(request_or_iterator: Any, context: Context) -> Any:
        if streaming_in:
            first, request_or_iterator = await _first_and_rest(request_or_iterator)
            principal = await authorize(first if first is not None else _EmptyRequest())
        else:
            principal = await authorize(request_or_iterator)
        _CURRENT.set(principal)
        result = behavior(request_or_iterator, context)
        return await result if inspect.isawaitable(result) else result

    return wrapper


def _stream(
    behavior: Callable[..., Any],
    authorize: Callable[[Any], Awaitable[Principal]],
    *,
    streaming_in: bool,
) -> Callable[..., AsyncIterator[Any]]:
    async def wrapper(request_or_iterator: Any, context: Context) -> AsyncIterator[Any]:
        if streaming_in:
            first, request_or_iterator = await _first_and_rest(request_or_iterator)
            principal = await authorize(first if first is not None else _EmptyRequest())
        else:
            principal = await authorize(request_or_iterator)
        _CURRENT.set(principal)
        result = behavior(request_or_iterator, context)
        if inspect.isawaitable(result):
            await result
        elif hasattr(result, "__aiter__"):
            async for item in result:
                yield item
        else:
            for item in result:
                yield item

    return wrapper
