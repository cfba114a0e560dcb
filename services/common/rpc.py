"""Types the servicers and the interceptor share."""

from __future__ import annotations

from typing import Any, TypeAlias

import grpc

# A servicer method's context; its request and response types are the method's own.
Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
