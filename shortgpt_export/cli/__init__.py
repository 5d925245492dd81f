"""Command line: ``shortgpt-export [MODEL] [options]`` or ``shortgpt-export SUBCOMMAND``."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys

from ..errors import ShortGPTError

SUBCOMMANDS = {
    "run": "shortgpt_export.cli.export",
    "score": "shortgpt_export.cli.score",
    "plan": "shortgpt_export.cli.plan",
    "prune": "shortgpt_export.cli.prune",
    "validate": "shortgpt_export.cli.validate",
    "download-default": "shortgpt_export.cli.download",
    "cache": "shortgpt_export.cli.cache",
}
# Errors from reading bad input that are not ours: each becomes one line and exit 2.
INPUT_ERRORS = (OSError, ValueError, OverflowError, RecursionError, MemoryError)
EXIT_SIGTERM = 143


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so every cleanup path runs as for Ctrl-C."""


def _on_sigterm(signum, frame):
    raise Terminated


class _UsageError(ShortGPTError):
    pass


def _parser_error(prog: str):
    def error(message: str):
        raise _UsageError(f"{prog}: {message}", hint=f"see {prog} -h")

    return error


def one_line(text: str, limit: int = 600) -> str:
    """``text`` on one line (newlines and control characters become spaces), shortened."""
    flat = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def print_error(message: str) -> None:
    """``error: message`` as one line on stderr; the message is never read as markup."""
    from rich.text import Text

    from . import common

    line = Text("error:", style="bold red")
    line.append(" " + one_line(message))
    common.stderr.print(line, highlight=False, soft_wrap=True)


def describe_input_error(exc: BaseException) -> str:
    """One line for an error raised while reading input, naming the file when known."""
    kind = type(exc).__name__
    if isinstance(exc, RecursionError):
        return "an input file nests its data too deeply to be read (RecursionError)"
    if isinstance(exc, MemoryError):
        return "an input file declares more data than fits in memory (MemoryError)"
    if isinstance(exc, UnicodeDecodeError):
        return f"an input file is not valid UTF-8 text ({exc.reason} at byte {exc.start})"
    if isinstance(exc, OSError):
        names = [str(n) for n in (exc.filename, exc.filename2) if n]
        where = f"{' -> '.join(names)}: " if names else ""
        return f"{where}{exc.strerror or exc} ({kind})"
    return f"{kind}: {exc}"


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 2 bad input, 130 Ctrl-C, 143 SIGTERM)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    name = argv.pop(0) if argv and argv[0] in SUBCOMMANDS else "run"
    previous = None
    # outside the main thread (embedded use) signal() raises; SIGTERM keeps its handler
    with contextlib.suppress(ValueError):
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        command = importlib.import_module(SUBCOMMANDS[name])
        parser: argparse.ArgumentParser = command.build_parser()
        parser.error = _parser_error(parser.prog)
        args = parser.parse_args(argv)
        if hasattr(command, "check_combinations"):
            command.check_combinations(parser, args)
        from . import common

        common.setup_logging(getattr(args, "verbose", False))
        return command.execute(args)
    except ShortGPTError as exc:
        print_error(f"{exc.message} — {exc.hint}" if exc.hint else exc.message)
        return exc.exit_code
    except Terminated:
        print_error("terminated (SIGTERM); no partial output was left behind")
        return EXIT_SIGTERM
    except KeyboardInterrupt:
        print_error("interrupted; no partial output was left behind")
        return 130
    except INPUT_ERRORS as exc:
        print_error(describe_input_error(exc))
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
