"""Command line: ``shortgpt-export [MODEL] [options]`` or ``shortgpt-export SUBCOMMAND``."""

from __future__ import annotations

import importlib
import sys

from ..errors import ShortGPTError

SUBCOMMANDS = {
    "run": "shortgpt_export.cli.run",
    "score": "shortgpt_export.cli.score",
    "prune": "shortgpt_export.cli.prune",
    "validate": "shortgpt_export.cli.validate",
    "download-default": "shortgpt_export.cli.download",
}


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 2 bad input, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    name = argv.pop(0) if argv and argv[0] in SUBCOMMANDS else "run"
    command = importlib.import_module(SUBCOMMANDS[name])
    args = command.build_parser().parse_args(argv)
    from . import common

    common.setup_logging(getattr(args, "verbose", False))
    try:
        return command.execute(args)
    except ShortGPTError as exc:
        hint = f" — {exc.hint}" if exc.hint else ""
        common.stderr.print(
            f"[bold red]error:[/bold red] {exc.message}{hint}",
            highlight=False,
            soft_wrap=True,
            markup=True,
        )
        return exc.exit_code
    except KeyboardInterrupt:
        common.stderr.print("interrupted; no partial output was left behind")
        return 130


if __name__ == "__main__":
    sys.exit(main())
