"""Configuration from command-line flags and `LORAFORGE_*` environment variables.

Each process describes its settings as a dataclass whose fields carry a help
text, and optionally the choices a value must be one of, a least value, or that it
is required.
Precedence: flag > environment variable > default. The variable for field
`object_store_url` is `LORAFORGE_OBJECT_STORE_URL`; `--help` lists every
setting with its variable and default. `load_config` refuses a value that is
not of its setting's type, not among its choices, below its minimum, or missing
where required,
with an `InvalidArgument` naming the flag and the variable; entry points load
their settings inside `server.run_main`, which makes that one line and exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from loraforge.services.common.errors import InvalidArgument

ENV_PREFIX = "LORAFORGE_"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")


def setting(
    default: Any,
    help: str,
    *,
    choices: Sequence[str] = (),
    required: bool = False,
    minimum: float | None = None,
) -> Any:
    """Declares a setting: a dataclass field with a default and a help text.

    `choices`: the values it may take (matched ignoring case). `required`: an
    empty value is refused. `minimum`: a number below it is refused.
    """
    return dataclasses.field(
        default=default,
        metadata={
            "help": help,
            "choices": tuple(choices),
            "required": required,
            "minimum": minimum,
        },
    )


def default_home() -> Path:
    return Path(os.environ.get("LORAFORGE_HOME", Path.home() / ".loraforge"))


@dataclasses.dataclass
class ProcessConfig:
    """Settings every process has (services and training workers)."""

    home: str = setting(
        "", "Folder for embedded state (SQLite files, local objects). Default ~/.loraforge."
    )
    database_url: str = setting(
        "",
        "SQLAlchemy URL of the service's metadata store (a training worker's is the trainer's). "
        "Default: SQLite file in `home`.",
    )
    object_store_url: str = setting(
        "",
        "Object store: a folder path or file:// URL (default `home`/objects), or "
        "s3://bucket[/prefix]?endpoint=host:port&secure=false (keys from "
        "LORAFORGE_S3_ACCESS_KEY / LORAFORGE_S3_SECRET_KEY).",
    )
    log_level: str = setting("INFO", "Log level: DEBUG, INFO, WARNING, ERROR.", choices=LOG_LEVELS)
    log_format: str = setting(
        "text", "Log format: text or json (one JSON object per line).", choices=LOG_FORMATS
    )
    service_key: str = setting(
        "",
        "This process's own credential (a service key) for the calls it makes to the other "
        "services; see `service_keys` of the dataset service.",
    )
    service_key_file: str = setting(
        "", "File holding `service_key` (read at start; takes precedence over an empty value)."
    )
    tls_ca_file: str = setting(
        "",
        "CA bundle (PEM) that verifies the services this process calls; set, its outgoing "
        "channels use TLS.",
    )
    tls_client_cert_file: str = setting(
        "", "Client certificate (PEM) presented to services that verify clients (mTLS)."
    )
    tls_client_key_file: str = setting("", "Private key (PEM) of `tls_client_cert_file`.")

    def home_path(self) -> Path:
        """The service's home; one made here is owner-only (it holds training data, keys and
        logs). An existing folder keeps the modes its owner gave it."""
        path = Path(self.home) if self.home else default_home()
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        return path

    def database_url_for(self, service: str) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.home_path() / (service + '.db')}"

    def object_store_url_or_default(self) -> str:
        return self.object_store_url or str(self.home_path() / "objects")


@dataclasses.dataclass
class ServerConfig(ProcessConfig):
    """Settings every gRPC service has."""

    host: str = setting("127.0.0.1", "Interface to listen on (0.0.0.0 for all).")
    port: int = setting(0, "Port to listen on; 0 picks a free one (printed at start).")
    shutdown_grace_seconds: float = setting(10.0, "On SIGTERM/SIGINT, time given to running calls.")
    ready_file: str = setting("", "If set, the bound port is written to this file once serving.")
    auth: str = setting(
        "on",
        "API keys on every RPC (health and reflection stay open): on or off. Off is refused "
        "on a non-loopback host unless `insecure` is set.",
        choices=("on", "off"),
    )
    auth_address: str = setting(
        "",
        "host:port of the service that verifies API keys (the dataset service); the trainer "
        "defaults to its dataset address. Not used by the dataset service itself.",
    )
    auth_cache_seconds: float = setting(
        30.0,
        "How long a verified API key is trusted without asking again: a revoked key stops "
        "working within this time.",
    )
    tls_cert_file: str = setting("", "Server certificate (PEM); set with `tls_key_file`, TLS only.")
    tls_key_file: str = setting("", "Private key (PEM) of `tls_cert_file`.")
    tls_client_ca_file: str = setting(
        "", "CA bundle (PEM): set, every client must present a certificate it signed (mTLS)."
    )
    insecure: bool = setting(
        False,
        "Allow listening on a non-loopback host with auth off or without TLS (the traffic, "
        "keys included, is then readable on the network).",
    )


C = TypeVar("C")


def _field_type(cls: type, field: dataclasses.Field[Any]) -> type:
    hints = typing.get_type_hints(cls)
    tp = hints[field.name]
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return typing.cast(type, tp)


_KINDS = {int: "a whole number", float: "a number", bool: "true or false"}


def describe(name: str) -> str:
    """How a user sets field `name`: `--flag (LORAFORGE_VARIABLE)`."""
    return f"--{name.replace('_', '-')} ({ENV_PREFIX}{name.upper()})"


def _parse(tp: type, raw: str, source: str) -> Any:
    try:
        if tp is bool:
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        return tp(raw)
    except ValueError:
        kind = _KINDS.get(tp, f"a valid {tp.__name__}")
        raise InvalidArgument(f"{source}: {raw!r} is not {kind}") from None


def _check(f: dataclasses.Field[Any], value: Any) -> Any:
    """`value` for setting `f` in its canonical spelling; InvalidArgument when it is refused."""
    choices: tuple[str, ...] = f.metadata.get("choices", ())
    if f.metadata.get("required") and not str(value).strip():
        raise InvalidArgument(
            f"{describe(f.name)} is required: {f.metadata.get('help', '')}".rstrip()
        )
    minimum = f.metadata.get("minimum")
    if minimum is not None and value < minimum:
        raise InvalidArgument(f"{describe(f.name)} must be at least {minimum} (got {value!r})")
    if choices:
        match = next((c for c in choices if c.lower() == str(value).lower()), None)
        if match is None:
            raise InvalidArgument(
                f"{describe(f.name)} must be one of {', '.join(choices)} (got {value!r})"
            )
        return match
    return value


def load_config(cls: type[C], argv: Sequence[str] | None = None, *, prog: str | None = None) -> C:
    """Builds `cls` from flags, then `LORAFORGE_*` variables, then defaults."""
    parser = argparse.ArgumentParser(prog=prog, description=(cls.__doc__ or "").strip())
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    for f in fields:
        env = ENV_PREFIX + f.name.upper()
        default = f.default if f.default is not dataclasses.MISSING else None
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=None,
            help=f"{f.metadata.get('help', '')} [env {env}; default {default!r}]",
        )
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    for f in fields:
        tp = _field_type(cls, f)
        env = ENV_PREFIX + f.name.upper()
        flag = getattr(args, f.name)
        if flag is not None:
            values[f.name] = _parse(tp, flag, "--" + f.name.replace("_", "-"))
        elif env in os.environ:
            values[f.name] = _parse(tp, os.environ[env], env)
        default = f.default if f.default is not dataclasses.MISSING else None
        values[f.name] = _check(f, values.get(f.name, default))
    return cls(**values)
