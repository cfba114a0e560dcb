"""Sign-in sessions: the API key stays on the server, the browser holds only a random id.

The id travels in an HttpOnly, SameSite=Strict cookie, so page scripts cannot read it and
other sites cannot make the browser send it; the key itself is never put in a page, a URL
or a log. A session also keeps the reports of its last uploads, so a report can be paged
without uploading again. Sessions live in this process's memory: a restart signs everyone
out, which is the price of holding no state.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from loraforge.dataset.v1 import dataset_service_pb2 as dpb

COOKIE = "loraforge_session"
KEPT_UPLOADS = 8


@dataclass
class Session:
    id: str
    api_key: str = ""
    last_seen: float = field(default_factory=time.monotonic)
    # Upload id -> (dataset name, report), newest last.
    uploads: OrderedDict[str, tuple[str, dpb.UploadInputsResponse]] = field(
        default_factory=OrderedDict
    )

    def keep_upload(self, dataset: str, report: dpb.UploadInputsResponse) -> None:
        self.uploads[report.upload_id] = (dataset, report)
        self.uploads.move_to_end(report.upload_id)
        while len(self.uploads) > KEPT_UPLOADS:
            self.uploads.popitem(last=False)


class Sessions:
    """Sessions by id, least recently used first; idle ones expire."""

    def __init__(self, idle_seconds: float, max_sessions: int) -> None:
        self.idle_seconds = idle_seconds
        self.max_sessions = max(1, max_sessions)
        self._by_id: OrderedDict[str, Session] = OrderedDict()

    def get(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        session = self._by_id.get(session_id)
        now = time.monotonic()
        if session is None:
            return None
        if now - session.last_seen > self.idle_seconds:
            del self._by_id[session_id]
            return None
        session.last_seen = now
        self._by_id.move_to_end(session_id)
        return session

    def create(self, api_key: str = "") -> Session:
        session = Session(secrets.token_urlsafe(32), api_key)
        self._by_id[session.id] = session
        while len(self._by_id) > self.max_sessions:
            self._by_id.popitem(last=False)
        return session

    def end(self, session_id: str | None) -> None:
        if session_id:
            self._by_id.pop(session_id, None)
