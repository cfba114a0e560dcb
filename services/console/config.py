"""Settings of the web console (flags `--x-y`, variables `LORAFORGE_X_Y`)."""

from __future__ import annotations

from dataclasses import dataclass

from loraforge.services.common.config import ServerConfig, setting


@dataclass
class ConsoleConfig(ServerConfig):
    """Settings of the web console. It is a client of the three services and keeps no state of
    its own beyond sign-in sessions (in memory): `home`, `database_url` and `object_store_url`
    are not used. With `auth` on it asks for an API key and sends it on every call."""

    dataset_address: str = setting("", "host:port of the DatasetService.", required=True)
    trainer_address: str = setting("", "host:port of the TrainerService.", required=True)
    predictor_address: str = setting("", "host:port of the PredictorService.", required=True)
    session_idle_seconds: float = setting(
        8 * 3600.0, "A signed-in session ends after this long without a request."
    )
    max_sessions: int = setting(
        10000, "Most sessions kept at once; past it the least recently used one ends."
    )
    secure_cookies: bool = setting(
        False,
        "Mark the session cookie Secure (sent over HTTPS only): set it when the console is "
        "reached through an HTTPS proxy (with `tls_cert_file` it is always Secure).",
    )
    max_upload_bytes: int = setting(2 * 1024**3, "Largest file one upload may send, in bytes.")
    max_request_bytes: int = setting(
        1024**2,
        "Largest body of any other request (forms, prompts), in bytes; a larger one is "
        "refused with 413 before it is read.",
        minimum=1,
    )
    allowed_hosts: str = setting(
        "",
        "Host names (comma-separated) the console answers for besides localhost, the host it "
        "listens on and the address a request reached: the name of a proxy in front of it, "
        "say. Any other Host header is refused (a guard against DNS rebinding); `*` allows any.",
    )
    call_timeout_seconds: float = setting(
        30.0, "Deadline of one call to a service (uploads and streams excepted), in seconds."
    )
