"""How the trainer and the predictor verify API keys: by asking the dataset service.

`RemoteVerifier` calls `AuthService.VerifyApiKey` at `auth_address` with the service's
own key and caches each answer for `auth_cache_seconds` (`auth.CachingVerifier`), so
only a key's first call in that time pays the round trip.
"""

from __future__ import annotations

import grpc

from loraforge.auth.v1 import auth_service_pb2 as pb
from loraforge.auth.v1 import auth_service_pb2_grpc as pb_grpc
from loraforge.services.common.auth import CachingVerifier, Principal, unknown_key
from loraforge.services.common.channels import ChannelSecurity, aio_channel
from loraforge.services.common.config import ServerConfig, describe
from loraforge.services.common.errors import InvalidArgument, Unavailable

VERIFY_TIMEOUT = 10.0


class RemoteVerifier:
    """Verifies keys through the dataset service's AuthService."""

    def __init__(self, address: str, security: ChannelSecurity, ttl: float) -> None:
        self.address = address
        self.security = security
        self._channel: grpc.aio.Channel | None = None
        self.cache = CachingVerifier(self.lookup, ttl)

    def _stub(self) -> pb_grpc.AuthServiceAsyncStub:
        if self._channel is None:
            self._channel = aio_channel(self.address, self.security)
        return pb_grpc.AuthServiceStub(self._channel)  # an aio channel makes the async stub

    async def lookup(self, key: str) -> Principal:
        try:
            response = await self._stub().VerifyApiKey(
                pb.VerifyApiKeyRequest(key=key), timeout=VERIFY_TIMEOUT
            )
        except grpc.RpcError as err:
            code = err.code()
            if code == grpc.StatusCode.NOT_FOUND:  # the key asked about is not valid
                raise unknown_key() from None
            if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                raise Unavailable(
                    f"cannot verify API keys: the dataset service at {self.address} refused "
                    f"this service's own key ({err.details()}); check --service-key",
                    reason="AUTH_MISCONFIGURED",
                ) from None
            raise Unavailable(
                f"cannot verify API keys: the dataset service at {self.address} did not "
                f"answer ({code.name}); retry shortly",
                reason="AUTH_UNAVAILABLE",
            ) from None
        p = response.principal
        return Principal(
            name=p.name,
            app=p.app.removeprefix("apps/"),
            scopes=frozenset(p.scopes),
            service=p.service,
            expire_time=p.expire_time.ToNanoseconds() / 1e9 if p.HasField("expire_time") else None,
        )

    async def verify(self, key: str) -> Principal:
        return await self.cache.verify(key)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()


def remote_verifier(
    config: ServerConfig, security: ChannelSecurity, default_address: str = ""
) -> RemoteVerifier | None:
    """The verifier a service's settings ask for (None with auth off)."""
    if config.auth != "on":
        return None
    address = config.auth_address or default_address
    if not address:
        raise InvalidArgument(
            f"{describe('auth_address')} is required with auth on: the dataset service's "
            f"host:port, which verifies API keys (or turn auth off with {describe('auth')})"
        )
    if not security.api_key:
        raise InvalidArgument(
            f"{describe('service_key')} (or {describe('service_key_file')}) is required with "
            "auth on: this service's own key, which the dataset service lists in its "
            "service_keys"
        )
    return RemoteVerifier(address, security, config.auth_cache_seconds)
