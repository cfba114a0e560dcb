"""The AuthService RPCs (hosted by the dataset service) and its key verification.

`LocalVerifier` is how the dataset service checks keys itself: the store, or the service
identities its settings name, behind a cache that a revocation here clears. The other
services reach the same lookup through `VerifyApiKey` (`common.verify.RemoteVerifier`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from loraforge.auth.v1 import auth_service_pb2 as pb
from loraforge.auth.v1 import auth_service_pb2_grpc as pb_grpc
from loraforge.services.common.auth import (
    CachingVerifier,
    Principal,
    current_principal,
    key_hash,
    key_id_of,
)
from loraforge.services.common.errors import NotFound, Unauthenticated, invalid_field
from loraforge.services.common.resources import ID_PATTERN, page_size, timestamp
from loraforge.services.common.rpc import Context
from loraforge.services.dataset.keys import ApiKeys, KeyRecord
from loraforge.services.dataset.pages import parse_page

# A key that should outlive this has no ttl at all.
MAX_KEY_TTL_SECONDS = 100 * 365 * 86400


class LocalVerifier:
    """Looks keys up in this service's own store (and its service identities)."""

    def __init__(self, keys: ApiKeys, service_keys: Mapping[str, str], ttl: float) -> None:
        self.keys = keys
        self.service_keys = dict(service_keys)  # key hash -> service
        self.cache = CachingVerifier(self.lookup, ttl)

    async def lookup(self, key: str) -> Principal:
        service = self.service_keys.get(key_hash(key))
        if service is not None:
            return Principal(name=f"services/{service}", service=service)
        record = await asyncio.to_thread(self.keys.lookup, key)
        return record.principal()

    async def verify(self, key: str) -> Principal:
        return await self.cache.verify(key)


def api_key_pb(record: KeyRecord) -> pb.ApiKey:
    return pb.ApiKey(
        name=record.name,
        prefix=record.prefix,
        app=f"apps/{record.app_id}" if record.app_id else "",
        scopes=list(record.scopes),
        description=record.description,
        create_time=timestamp(record.create_time),
        expire_time=timestamp(record.expire_time),
        revoke_time=timestamp(record.revoke_time),
    )


def principal_pb(principal: Principal) -> pb.Principal:
    return pb.Principal(
        name=principal.name,
        app=f"apps/{principal.app}" if principal.app else "",
        scopes=sorted(principal.scopes),
        service=principal.service,
        expire_time=timestamp(principal.expire_time),
    )


def _app_id(value: str, field: str) -> str:
    """An app given as `apps/{app}` or as its id; '' stays ''."""
    app_id = value.removeprefix("apps/")
    if app_id and not ID_PATTERN.match(app_id):
        raise invalid_field(field, f"{value!r} is not an app name like `apps/shop`")
    return app_id


def _key_id(value: str) -> str:
    """The id in `apiKeys/{id}`, `lf_{id}`, a whole key, or the id alone."""
    text = value.strip()
    whole = key_id_of(text)
    if whole:
        return whole
    key_id = text.removeprefix("apiKeys/").removeprefix("lf_")
    if len(key_id) == 12 and all(c in "0123456789abcdef" for c in key_id):
        return key_id
    raise invalid_field(
        "name", f"{value!r} is not a key name (`apiKeys/{{id}}`, `lf_{{id}}` or the 12-digit id)"
    )


class AuthServicer(pb_grpc.AuthServiceServicer):
    """Keys: created by admins, listed without secrets, revoked; verified for the services."""

    def __init__(self, keys: ApiKeys, verifier: LocalVerifier) -> None:
        self.keys = keys
        self.verifier = verifier

    async def CreateApiKey(
        self, request: pb.CreateApiKeyRequest, context: Context
    ) -> pb.CreateApiKeyResponse:
        app_id = _app_id(request.app, "app")
        # Read as numbers, not with ToTimedelta: a Duration of any int64 seconds is a user's
        # mistake to name, not an overflow.
        ttl = request.ttl.seconds + request.ttl.nanos / 1e9 if request.HasField("ttl") else 0.0
        if ttl < 0:
            raise invalid_field("ttl", "must not be negative")
        if ttl > MAX_KEY_TTL_SECONDS:
            raise invalid_field(
                "ttl",
                f"must be at most {MAX_KEY_TTL_SECONDS // 86400:,} days (got {ttl:.0f} s); "
                "leave it unset for a key that does not expire",
            )
        record, secret = await asyncio.to_thread(
            lambda: self.keys.create(
                app_id,
                list(request.scopes),
                ttl_seconds=ttl or None,
                description=request.description,
            )
        )
        return pb.CreateApiKeyResponse(api_key=api_key_pb(record), secret=secret)

    async def ListApiKeys(
        self, request: pb.ListApiKeysRequest, context: Context
    ) -> pb.ListApiKeysResponse:
        app_id = _app_id(request.app, "app")
        page = parse_page(page_size(request.page_size), request.page_token, app_id, "ListApiKeys")
        records, token = await asyncio.to_thread(
            self.keys.list, app_id, request.show_inactive, page
        )
        return pb.ListApiKeysResponse(
            api_keys=[api_key_pb(r) for r in records], next_page_token=token
        )

    async def RevokeApiKey(
        self, request: pb.RevokeApiKeyRequest, context: Context
    ) -> pb.RevokeApiKeyResponse:
        record = await asyncio.to_thread(self.keys.revoke, _key_id(request.name))
        self.verifier.cache.forget()
        return pb.RevokeApiKeyResponse(api_key=api_key_pb(record))

    async def VerifyApiKey(
        self, request: pb.VerifyApiKeyRequest, context: Context
    ) -> pb.VerifyApiKeyResponse:
        # Uncached: the caller caches, and a revocation must reach it within its own time.
        try:
            principal = await self.verifier.lookup(request.key)
        except Unauthenticated as exc:  # the key asked about; the caller's own is fine
            raise NotFound(exc.message, reason=exc.reason) from None
        return pb.VerifyApiKeyResponse(principal=principal_pb(principal))

    async def WhoAmI(self, request: pb.WhoAmIRequest, context: Context) -> pb.WhoAmIResponse:
        principal = current_principal()
        if principal is None:  # auth off: everyone is everything
            principal = Principal(name="anonymous", scopes=frozenset({"admin"}))
        return pb.WhoAmIResponse(principal=principal_pb(principal))
