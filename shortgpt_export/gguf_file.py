"""Read a GGUF file: open it (header checked first), read a field, describe it.

Used by GGUF export, GGUF → GGUF pruning, verification and validation alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import CorruptModelError


def open_gguf(path: Path):
    """A ``gguf.GGUFReader`` for ``path``; any parse failure becomes CorruptModelError."""
    from gguf import GGUFReader

    from .gguf_header import check_gguf_header

    check_gguf_header(path)
    try:
        return GGUFReader(path)
    except Exception as exc:
        raise CorruptModelError(
            f"cannot read GGUF file {path}: {type(exc).__name__}: {exc}"[:300],
            hint="the file is truncated or not GGUF; re-download or re-export it",
        ) from exc


def field_value(reader, key: str):
    """The value of ``key``, or None when the file has no such field."""
    field = reader.get_field(key)
    return None if field is None else field.contents()


@dataclass(frozen=True)
class GGUFInfo:
    arch: str
    block_count: int
    file_type: str | None  # e.g. "Q4_1", from general.file_type


def gguf_info(reader) -> GGUFInfo:
    """Architecture, block count and file type of an open GGUF file."""
    from gguf import LlamaFileType

    arch = field_value(reader, "general.architecture")
    blocks = field_value(reader, f"{arch}.block_count")
    if arch is None or blocks is None:
        raise CorruptModelError("GGUF file has no general.architecture or block_count")
    file_type = field_value(reader, "general.file_type")
    try:
        label = LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        label = None
    return GGUFInfo(arch=arch, block_count=int(blocks), file_type=label)
