"""Entry point: `python -m loraforge.services.console` (or `loraforge-console`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from loraforge.services.common.config import load_config
from loraforge.services.common.logs import setup_logging
from loraforge.services.common.server import run_main
from loraforge.services.console.config import ConsoleConfig
from loraforge.services.console.server import serve

__all__ = ["ConsoleConfig", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    async def start() -> None:
        # Loaded inside `run_main`, so a bad setting is one line and exit 2, not a traceback.
        config = load_config(ConsoleConfig, argv, prog="loraforge-console")
        setup_logging(config.log_level, config.log_format, service="console")
        await serve(config)

    return run_main(start())


if __name__ == "__main__":
    sys.exit(main())
