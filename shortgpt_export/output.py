"""All-or-nothing output folders: write under a temporary name, rename at the end."""

from __future__ import annotations

import errno
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import DiskFullError, OutputExistsError

log = logging.getLogger(__name__)


def check_writable(final: Path, force: bool) -> None:
    if final.exists() and not force:
        raise OutputExistsError(
            f"output {final} already exists",
            hint="pass --force to replace it, or choose another --out",
        )


@contextmanager
def staged_output(final: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``final``; on success it replaces ``final``.

    On any error, Ctrl-C included, the temporary folder is removed and ``final`` is left
    as it was. A full disk becomes :class:`DiskFullError`.
    """
    final = Path(final)
    check_writable(final, force)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise DiskFullError(
                f"the disk filled up while writing {final}; nothing was left behind",
                hint="free some space or choose another --out",
            ) from exc
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    backup = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        os.replace(final, backup)
    os.replace(staging, final)
    if backup.exists():
        shutil.rmtree(backup) if backup.is_dir() else backup.unlink()
    log.info("wrote %s", final)
