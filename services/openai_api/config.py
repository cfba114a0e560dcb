"""Settings of the OpenAI-compatible HTTP API (flags `--x-y`, variables `LORAFORGE_X_Y`)."""

from __future__ import annotations

from dataclasses import dataclass

from loraforge.services.common.config import ServerConfig, setting


@dataclass
class OpenAIConfig(ServerConfig):
    """Settings of the OpenAI-compatible HTTP API. It keeps no state of its own: `home`,
    `database_url` and `object_store_url` are not used. Nor are `service_key`, `auth` and
    `auth_address`: each call to the services carries its HTTP caller's own
    `Authorization: Bearer` key, which the services check. `tls_ca_file` (with
    `tls_client_cert_file` and `tls_client_key_file` for mTLS) secures the calls to the
    services; `tls_cert_file` and `tls_key_file` serve HTTPS (`tls_client_ca_file`: only to
    clients with a certificate it signed)."""

    predictor_address: str = setting(
        "", "host:port of the PredictorService, which answers completions.", required=True
    )
    trainer_address: str = setting(
        "",
        "host:port of the TrainerService, which lists trained models for GET /v1/models. "
        "Empty: only the base model is listed.",
    )
    dataset_address: str = setting(
        "",
        "host:port of the DatasetService, which lists the apps whose models GET /v1/models "
        "lists. Empty: only the base model is listed.",
    )
    request_timeout_seconds: float = setting(
        600.0, "Deadline of one completion at the predictor, in seconds."
    )
    models_cache_seconds: float = setting(
        10.0, "How long GET /v1/models reuses the list it built from the trainer."
    )
    max_request_bytes: int = setting(
        4 * 1024**2,
        "Largest request body, in bytes; a larger one is refused with 413 before it is read.",
        minimum=1,
    )
    max_listed_models: int = setting(
        1000, "Most models and model versions GET /v1/models lists (the base model comes first)."
    )
