"""All-or-nothing output folders: write under a temporary name, rename at the end.

Before any work the output location is checked: it must not be, contain or lie inside any
input (after resolving symlinks), must not be the current folder or one of its
ancestors, and its parent must be writable (a probe file is created and removed).
Temporary folders left by earlier runs whose process is gone are removed.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import DiskFullError, OutputExistsError, UnsafeOutputError

log = logging.getLogger(__name__)

NAME_MARGIN = 24  # room for the ".NAME.tmp-PID" staging name


def resolve_out(final: Path) -> Path:
    """``final`` as an absolute path with symlinks resolved (a symlinked folder is its target)."""
    return Path(os.path.abspath(Path(final).expanduser())).resolve()


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_no_overlap(
    final: Path, inputs: Iterable[tuple[str, Path | str | None]], *, replaced: bool = True
) -> None:
    """Refuse an output that is, contains or lies inside an input, or holds the current folder.

    ``inputs`` are (label, path) pairs such as ("model", folder) or ("calibration file", f);
    paths that do not exist (hub ids, dataset names) are ignored. ``replaced=False`` is for
    a folder that only receives a file (``score``), so it may be the current folder.
    """
    out = resolve_out(final)
    cwd = Path.cwd().resolve()
    if replaced and _is_within(cwd, out):
        raise UnsafeOutputError(
            f"output {final} is the current folder or one of its parents",
            hint="choose a new sub-folder, e.g. --out pruned",
        )
    for label, path in inputs:
        if path is None:
            continue
        path = Path(path).expanduser()
        if not path.exists():
            continue
        real = path.resolve()
        if _is_within(real, out) or _is_within(out, real):
            where = "is" if real == out else ("contains" if out in real.parents else "lies inside")
            raise UnsafeOutputError(
                f"output {final} {where} the {label} {path}; --force would delete it",
                hint="choose an --out folder apart from every input",
            )


def check_writable(final: Path, force: bool) -> None:
    """``final`` has a usable name, is free (or ``force``), and its parent can be written."""
    final = Path(final)
    parent = resolve_out(final).parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UnsafeOutputError(
            f"cannot create {final}: {parent} is a file, not a folder",
            hint="choose another --out",
        )
    try:
        name_max = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    too_long = [p for p in final.parts if len(p.encode()) > name_max]
    if len(resolve_out(final).name.encode()) + NAME_MARGIN > name_max or too_long:
        raise UnsafeOutputError(
            f"output name {final.name[:40]}... is too long for this file system "
            f"({name_max} bytes at most, with room for a temporary suffix)",
            hint="choose a shorter --out",
        )
    if (final.exists() or final.is_symlink()) and not force:
        raise OutputExistsError(
            f"output {final} already exists",
            hint="pass --force to replace it, or choose another --out",
        )
    probe = parent / f".shortgpt-probe-{os.getpid()}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        raise UnsafeOutputError(
            f"cannot write into {parent}: {exc.strerror or exc}",
            hint="choose a writable --out",
        ) from exc


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def reclaim_stale(final: Path) -> list[Path]:
    """Remove ``.NAME.tmp-PID`` / ``.NAME.old-PID`` siblings of ``final`` whose PID is dead.

    A stale ``.old-`` folder is the previous output caught mid-swap: it is put back when
    ``final`` is missing.
    """
    parent, removed = final.parent, []
    if not parent.is_dir():
        return removed
    pattern = re.compile(re.escape(f".{final.name}.") + r"(tmp|old)-(\d+)")
    for entry in parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if not match or _pid_alive(int(match.group(2))):
            continue
        if match.group(1) == "old" and not (final.exists() or final.is_symlink()):
            os.replace(entry, final)
            log.warning(
                "restored %s from %s, left by an earlier run that was stopped", final, entry
            )
            continue
        _remove(entry)
        removed.append(entry)
        log.warning("removed %s, left by an earlier run that was stopped", entry)
    return removed


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def staged_output(final: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``final``; on success it replaces ``final``.

    A symlinked ``final`` is followed: its target folder is replaced. On any error,
    Ctrl-C and SIGTERM included, the temporary folder is removed and ``final`` is left
    as it was. A full disk becomes :class:`DiskFullError`.
    """
    check_writable(final, force)
    shown, final = Path(final), resolve_out(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    reclaim_stale(final)
    staging = final.parent / f".{final.name}.tmp-{os.getpid()}"
    _remove(staging)
    staging.mkdir()
    try:
        yield staging
    except OSError as exc:
        _remove(staging)
        if exc.errno == errno.ENOSPC:
            raise DiskFullError(
                f"the disk filled up while writing {shown}; nothing was left behind",
                hint="free some space or choose another --out",
            ) from exc
        raise
    except BaseException:
        _remove(staging)
        raise
    backup = final.parent / f".{final.name}.old-{os.getpid()}"
    try:
        if final.exists():
            os.replace(final, backup)
        os.replace(staging, final)
    except BaseException:
        _remove(staging)
        if backup.exists() and not final.exists():
            os.replace(backup, final)
        raise
    if backup.exists():
        _remove(backup)
    log.info("wrote %s", shown)
