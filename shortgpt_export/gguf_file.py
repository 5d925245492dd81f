"""Read a GGUF file: open it (header checked as it is parsed), read a field, describe it.

Used by GGUF export, GGUF → GGUF pruning, verification and validation alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CorruptModelError

# numpy dtypes of the unquantized ggml types; every other type is read as raw bytes
NATIVE_DTYPES = {
    "F32": "f4", "F16": "f2", "F64": "f8", "I8": "i1", "I16": "i2", "I32": "i4", "I64": "i8",
}  # fmt: skip


@dataclass(frozen=True)
class GGUFField:
    """One metadata key: its value and GGUF value types (``(ARRAY, item type)`` for an
    array), ready for ``GGUFWriter.add_key_value``."""

    name: str
    value: Any
    types: tuple

    def contents(self):
        return self.value


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor entry; ``data`` is a memory-mapped view (raw bytes, one row per row of
    blocks, for quantized types), as ``GGUFWriter.add_tensor_info`` takes it."""

    name: str
    shape: tuple[int, ...]  # ggml order: the row length first
    tensor_type: Any  # gguf.GGMLQuantizationType
    n_elements: int
    n_bytes: int
    data: Any  # numpy array
    start: int  # where ``data`` starts in the file


class GGUFFile:
    """A GGUF file's metadata and memory-mapped tensors, read in one pass.

    ``gguf.GGUFReader`` builds a numpy view per string of the vocabulary (seconds for a
    49k-token one); this parses the header with :mod:`gguf_header`'s bounds-checked reader
    and maps only the tensor data.
    """

    def __init__(self, path: Path):
        import numpy as np
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

        from .gguf_header import parse_gguf_header

        self.path = Path(path)
        layout = parse_gguf_header(self.path)
        self.data_offset = layout.data_start
        self.endian = layout.endian  # "<" or ">"
        self.fields = {
            name: GGUFField(
                name,
                value,
                (GGUFValueType(vtype),)
                if item_type is None
                else (GGUFValueType(vtype), GGUFValueType(item_type)),
            )
            for name, value, vtype, item_type in layout.fields
        }
        raw = np.memmap(self.path, dtype=np.uint8, mode="r")
        self.tensors = []
        for name, dims, ggml_type, offset in layout.tensors:
            kind = GGMLQuantizationType(ggml_type)
            block, type_size = GGML_QUANT_SIZES[kind]
            if not dims and kind.name not in NATIVE_DTYPES:
                raise CorruptModelError(
                    f"cannot read GGUF file {path}: tensor {name} is a {kind.name} scalar",
                    hint="the file is damaged; re-download or re-export it",
                )
            n_elements = math.prod(dims)
            n_bytes = n_elements // block * type_size
            start = layout.data_start + offset
            view = raw[start : start + n_bytes]
            rows = tuple(reversed(dims[1:]))
            if kind.name in NATIVE_DTYPES:
                dtype = np.dtype(NATIVE_DTYPES[kind.name]).newbyteorder(layout.endian)
                data = view.view(dtype).reshape((*rows, dims[0]) if dims else ())
            else:
                data = view.reshape((*rows, dims[0] // block * type_size))
            self.tensors.append(
                GGUFTensor(name, tuple(dims), kind, n_elements, n_bytes, data, start)
            )

    def get_field(self, key: str) -> GGUFField | None:
        return self.fields.get(key)


def open_gguf(path: Path) -> GGUFFile:
    """The metadata and memory-mapped tensors of ``path``; a damaged file (any count or
    offset beyond the file, strings that are not UTF-8) raises CorruptModelError."""
    return GGUFFile(path)


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
