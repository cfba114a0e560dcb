"""Configuration from command-line flags and `LORAFORGE_*` environment variables.

Each service describes its settings as a dataclass whose fields carry a help
text. Precedence: flag > environment variable > default. The variable for field
`object_store_url` is `LORAFORGE_OBJECT_STORE_URL`; `--help` lists every
setting with its variable and default.
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


def setting(default: Any, help: str) -> Any:
    """Declares a setting: a dataclass field with a default and a help text."""
    return dataclasses.field(default=default, metadata={"help": help})


def default_home() -> Path:
    return Path(os.environ.get("LORAFORGE_HOME", Path.home() / ".loraforge"))


@dataclasses.dataclass
class ServerConfig:
    """Settings every service has."""

    host: str = setting("127.0.0.1", "Interface to listen on (0.0.0.0 for all).")
    port: int = setting(0, "Port to listen on; 0 picks a free one (printed at start).")
    home: str = setting(
        "", "Folder for embedded state (SQLite files, local objects). Default ~/.loraforge."
    )
    database_url: str = setting(
        "", "SQLAlchemy URL of this service's metadata store. Default: SQLite file in `home`."
    )
    object_store_url: str = setting(
        "",
        "Object store: a folder path or file:// URL (default `home`/objects), or "
        "s3://bucket[/prefix]?endpoint=host:port&secure=false (keys from "
        "LORAFORGE_S3_ACCESS_KEY / LORAFORGE_S3_SECRET_KEY).",
    )
    log_level: str = setting("INFO", "Log level: DEBUG, INFO, WARNING, ERROR.")
    log_format: str = setting("text", "Log format: text or json (one JSON object per line).")
    shutdown_grace_seconds: float = setting(10.0, "On SIGTERM/SIGINT, time given to running calls.")
    ready_file: str = setting("", "If set, the bound port is written to this file once serving.")

    def home_path(self) -> Path:
        path = Path(self.home) if self.home else default_home()
        path.mkdir(parents=True, exist_ok=True)
        return path

    def database_url_for(self, service: str) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.home_path() / (service + '.db')}"

    def object_store_url_or_default(self) -> str:
        return self.object_store_url or str(self.home_path() / "objects")


C = TypeVar("C")


def _field_type(cls: type, field: dataclasses.Field[Any]) -> type:
    hints = typing.get_type_hints(cls)
    tp = hints[field.name]
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


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
        raise InvalidArgument(f"{source}: {raw!r} is not a valid {tp.__name__}") from None


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
    return cls(**values)
