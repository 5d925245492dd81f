"""Minimal streaming safetensors reader/writer.

Reading parses only the JSON header; writing copies each tensor's bytes straight from the
memory-mapped source file into the output, a chunk at a time. Peak memory is one chunk,
whatever the size of the model.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import CorruptModelError

DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
MAX_HEADER = 100 * 1024 * 1024
COPY_CHUNK = 16 * 1024 * 1024


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes live in a safetensors file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    start: int  # absolute byte offset in ``path``
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    def renamed(self, name: str) -> TensorRef:
        return TensorRef(name, self.dtype, self.shape, self.path, self.start, self.end)


def read_header(path: Path) -> tuple[dict[str, TensorRef], dict[str, str]]:
    """Tensor locations and ``__metadata__`` of a safetensors file; raises on any corruption."""
    path = Path(path)
    size = path.stat().st_size

    def corrupt(why: str) -> CorruptModelError:
        return CorruptModelError(
            f"{path} is not a valid safetensors file: {why}",
            hint="re-download or re-save the model",
        )

    with open(path, "rb") as fh:
        raw_len = fh.read(8)
        if len(raw_len) < 8:
            raise corrupt("file shorter than its 8-byte header length")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > min(MAX_HEADER, size - 8):
            raise corrupt(f"header length {header_len} exceeds the file size {size}")
        try:
            header = json.loads(fh.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise corrupt(f"header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    base = 8 + header_len
    metadata = header.pop("__metadata__", {}) or {}
    tensors: dict[str, TensorRef] = {}
    for name, info in header.items():
        try:
            dtype, shape = info["dtype"], tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise corrupt(f"bad entry for tensor {name!r}") from exc
        if dtype not in DTYPE_SIZES:
            raise corrupt(f"tensor {name!r} has unknown dtype {dtype!r}")
        expected = math.prod(shape) * DTYPE_SIZES[dtype]
        if end - begin != expected or begin < 0 or base + end > size:
            raise corrupt(
                f"tensor {name!r} spans bytes {begin}..{end} but needs {expected} "
                f"and the data section holds {size - base}"
            )
        tensors[name] = TensorRef(name, dtype, shape, path, base + begin, base + end)
    return tensors, metadata


def write_safetensors(
    path: Path, tensors: Iterable[TensorRef], metadata: dict | None = None
) -> int:
    """Write ``tensors`` (in the given order) to ``path``, copying bytes from their sources.

    Returns the number of bytes written.
    """
    tensors = list(tensors)
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for ref in tensors:
        header[ref.name] = {
            "dtype": ref.dtype,
            "shape": list(ref.shape),
            "data_offsets": [offset, offset + ref.nbytes],
        }
        offset += ref.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data section starts 8-byte aligned
    maps: dict[Path, mmap.mmap] = {}
    try:
        with open(path, "wb") as out:
            out.write(struct.pack("<Q", len(blob)))
            out.write(blob)
            for ref in tensors:
                if ref.path not in maps:
                    with open(ref.path, "rb") as src:
                        maps[ref.path] = mmap.mmap(src.fileno(), 0, access=mmap.ACCESS_READ)
                view = memoryview(maps[ref.path])
                try:
                    for pos in range(ref.start, ref.end, COPY_CHUNK):
                        out.write(view[pos : min(pos + COPY_CHUNK, ref.end)])
                finally:
                    view.release()
    finally:
        for mapped in maps.values():
            mapped.close()
    return 8 + len(blob) + offset


TORCH_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64",
                "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
                "BOOL": "bool"}  # fmt: skip


def load_tensor(ref: TensorRef):
    """Read one tensor from its file into a new torch tensor (one copy, nothing cached)."""
    import torch

    if ref.dtype not in TORCH_DTYPES:
        raise CorruptModelError(f"tensor {ref.name} has dtype {ref.dtype}, which cannot be read")
    buffer = bytearray(ref.nbytes)
    with open(ref.path, "rb") as fh:
        fh.seek(ref.start)
        fh.readinto(buffer)
    dtype = getattr(torch, TORCH_DTYPES[ref.dtype])
    return (
        torch.frombuffer(buffer, dtype=dtype).reshape(ref.shape)
        if ref.nbytes
        else torch.empty(ref.shape, dtype=dtype)
    )
