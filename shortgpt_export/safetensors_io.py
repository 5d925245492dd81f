"""Minimal streaming safetensors reader/writer.

Reading parses only the JSON header; writing copies each tensor's bytes from the source
file into the output inside the kernel (``copy_file_range``/``sendfile``, as a plain file
copy does), else from a memory map a chunk at a time. Peak memory is one chunk, whatever
the size of the model.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import mmap
import os
import struct
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import orjson

from .errors import CorruptModelError

log = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class ComputedTensor:
    """A tensor made when it is written: ``produce()`` returns its ``nbytes`` bytes
    (a GGUF tensor dequantized, for instance); renamed like a TensorRef."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    produce: Callable[[], object]  # -> a bytes-like object

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]

    def renamed(self, name: str) -> ComputedTensor:
        return ComputedTensor(name, self.dtype, self.shape, self.produce)


MAX_JSON_DEPTH = 4  # {name: {"shape": [..]}} needs 3; deeper nesting is refused


def _nesting(value, limit: int) -> int:
    """Bracket nesting of a parsed JSON value; past ``limit`` it stops counting (the
    result is then ``limit + 2``), so a crafted header costs no more than a valid one."""
    if not isinstance(value, (dict, list)):
        return 0
    if limit < 0:
        return 1
    items = value.values() if isinstance(value, dict) else value
    return 1 + max((_nesting(v, limit - 1) for v in items), default=0)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_header(path: Path) -> tuple[dict[str, TensorRef], dict[str, str]]:
    """Tensor locations and ``__metadata__`` of a safetensors file; raises on any corruption.

    Every entry is checked: known dtype, non-negative integer shape, ``end - start`` equal
    to the tensor's byte size, and the tensors tiling the data section in order from 0 to
    the end of the file (what the ``safetensors`` library itself requires).
    """
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
        raw = fh.read(header_len)
    deep = corrupt(f"header JSON nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        # orjson: strict JSON (no NaN or infinity, valid UTF-8; integers beyond 64 bits
        # come back as floats, which the shape and offset checks refuse), its own bound
        # on nesting, and a few times faster than json on large headers
        header = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "depth limit" in str(exc):
            raise deep from None
        raise corrupt(f"header is not strict JSON ({str(exc)[:120]})") from None
    if _nesting(header, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise deep
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    base = 8 + header_len
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise corrupt("__metadata__ is not a map of strings to strings")
    tensors: dict[str, TensorRef] = {}
    for name, info in header.items():
        if not isinstance(info, dict):
            raise corrupt(f"entry for tensor {name!r} is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise corrupt(f"tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise corrupt(f"tensor {name!r} has shape {shape!r}, not non-negative integers")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_int(x) and x >= 0 for x in offsets)
        ):
            raise corrupt(f"tensor {name!r} has data_offsets {offsets!r}, not two integers >= 0")
        begin, end = offsets
        expected = math.prod(shape) * DTYPE_SIZES[dtype]
        if end - begin != expected or base + end > size:
            raise corrupt(
                f"tensor {name!r} spans bytes {begin}..{end} but needs {expected} "
                f"and the data section holds {size - base}"
            )
        tensors[name] = TensorRef(name, dtype, tuple(shape), path, base + begin, base + end)
    position = base
    for ref in sorted(tensors.values(), key=lambda r: (r.start, r.end)):
        if ref.start != position:
            raise corrupt(
                f"tensor {ref.name!r} starts at byte {ref.start - base} of the data section, "
                f"expected {position - base} (tensors overlap or leave a gap)"
            )
        position = ref.end
    if position != size:
        raise corrupt(f"{size - position} bytes after the last tensor belong to no tensor")
    return tensors, metadata


def write_safetensors(
    path: Path, tensors: Iterable[TensorRef | ComputedTensor], metadata: dict | None = None
) -> int:
    """Write ``tensors`` (in the given order) to ``path``, copying bytes from their sources
    (or, for a ComputedTensor, writing what it produces, one tensor in memory at a time).

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
    with open(path, "wb", buffering=0) as out, RangeCopier(out.fileno()) as copier:
        write_all(out.fileno(), struct.pack("<Q", len(blob)) + blob)
        for ref in tensors:
            if isinstance(ref, ComputedTensor):
                data = memoryview(ref.produce()).cast("B")
                if data.nbytes != ref.nbytes:
                    raise CorruptModelError(
                        f"tensor {ref.name} came out as {data.nbytes} bytes, its shape "
                        f"{list(ref.shape)} needs {ref.nbytes}",
                        hint="check that the model's metadata matches its tensors",
                    )
                copier.flush()
                write_all(out.fileno(), data)
            else:
                copier.add(ref.path, ref.start, ref.end)
    return 8 + len(blob) + offset


def write_all(fd: int, data) -> None:
    """All of ``data`` (bytes-like) to the file descriptor ``fd``."""
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view) :]


class RangeCopier:
    """Byte ranges of source files appended to the file descriptor ``fd``, adjacent ranges
    of one file merged, copied inside the kernel (``copy_file_range``, else ``sendfile``)
    as a plain file copy is: no page of the source is mapped or read into this process.
    A call the OS refuses for these files (``REFUSED`` errors), or that copies nothing
    while the source is long enough (some network and FUSE file systems), is dropped for
    the rest of the copy; with neither left, ranges are written from a memory map of the
    source. A source shorter than a range is refused whichever way copies it."""

    REFUSED = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF}

    MERGED_MAX = 64 * 1024 * 1024  # merged up to this size: progress lags one run at most

    def __init__(self, fd: int):
        self.fd = fd
        self.pending: tuple[Path, int, int] | None = None
        self.files: dict[Path, object] = {}
        self.calls = _kernel_copies()

    def add(self, path: Path, start: int, end: int) -> None:
        """Copy bytes ``start .. end`` of ``path`` next (at the latest on :meth:`flush`)."""
        pending = self.pending
        if (
            pending
            and pending[0] == path
            and pending[2] == start
            and end - pending[1] <= self.MERGED_MAX
        ):
            self.pending = (path, pending[1], end)
            return
        self.flush()
        self.pending = (path, start, end)

    def flush(self) -> None:
        """Copy what :meth:`add` left pending (before anything else is written to ``fd``)."""
        if self.pending is None:
            return
        path, start, end = self.pending
        self.pending = None
        if path not in self.files:
            self.files[path] = open(path, "rb", buffering=0)  # noqa: SIM115
        src = self.files[path].fileno()
        if os.fstat(src).st_size < end:
            raise CorruptModelError(f"{path} ends before byte {end}", hint="re-download the model")
        while start < end and self.calls:
            try:
                done = self.calls[0](src, self.fd, start, end - start)
            except OSError as exc:
                if exc.errno not in self.REFUSED:
                    raise
                log.debug("%s refused (%s)", self.calls.pop(0).__name__, exc)
                continue
            if not done:  # nothing copied although the source holds the range
                log.debug("%s copied nothing", self.calls.pop(0).__name__)
            start += done
        if start < end:
            with mmap.mmap(src, 0, access=mmap.ACCESS_READ) as mapped:
                if len(mapped) < end:  # cut short since the size was checked
                    raise CorruptModelError(
                        f"{path} ends before byte {end}", hint="re-download the model"
                    )
                view = memoryview(mapped)
                try:
                    for pos in range(start, end, COPY_CHUNK):
                        write_all(self.fd, view[pos : min(pos + COPY_CHUNK, end)])
                finally:
                    view.release()

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback) -> None:
        try:
            if kind is None:
                self.flush()
        finally:
            for fh in self.files.values():
                fh.close()


def _copy_file_range(src: int, dst: int, offset: int, count: int) -> int:
    """Up to ``count`` bytes of ``src`` from ``offset`` appended at ``dst``'s position."""
    return os.copy_file_range(src, dst, count, offset)


def _sendfile(src: int, dst: int, offset: int, count: int) -> int:
    return os.sendfile(dst, src, offset, count)


def _kernel_copies() -> list:
    """The in-kernel copies this OS has, preferred first (sendfile writes to regular files
    on Linux only)."""
    calls = [_copy_file_range] if hasattr(os, "copy_file_range") else []
    if hasattr(os, "sendfile") and sys.platform.startswith("linux"):
        calls.append(_sendfile)
    return calls


TORCH_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64",
                "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
                "BOOL": "bool"}  # fmt: skip


def torch_dtype(ref: TensorRef):
    """The torch dtype of a tensor's stored bytes; raises for dtypes torch cannot read."""
    import torch

    if ref.dtype not in TORCH_DTYPES:
        raise CorruptModelError(f"tensor {ref.name} has dtype {ref.dtype}, which cannot be read")
    return getattr(torch, TORCH_DTYPES[ref.dtype])


def load_tensor(ref: TensorRef):
    """Read one tensor from its file into a new torch tensor (one copy, nothing cached)."""
    return read_tensor_into(ref, bytearray(ref.nbytes))


def read_tensor_into(ref: TensorRef, buffer: bytearray, files: dict | None = None):
    """Read one tensor into the start of ``buffer`` (reused across calls); a torch view of it.

    The view is valid until the buffer is next written: convert or copy it before then.
    ``files`` (path -> open binary file) keeps each source file open across calls; the
    caller closes them.
    """
    import torch

    dtype = torch_dtype(ref)
    if not ref.nbytes:
        return torch.empty(ref.shape, dtype=dtype)
    view = memoryview(buffer)[: ref.nbytes]
    owned = files is None
    files = {} if owned else files
    try:
        read_range(ref, 0, view, files)
    finally:
        if owned:
            for fh in files.values():
                fh.close()
    return torch.frombuffer(view, dtype=dtype).reshape(ref.shape)


def read_range(ref: TensorRef, first: int, view, files: dict) -> None:
    """Bytes ``first .. first + len(view)`` of ``ref``'s data into ``view``; ``files``
    (path -> open binary file) keeps each source file open across calls."""
    if ref.path not in files:
        files[ref.path] = open(ref.path, "rb", buffering=0)  # noqa: SIM115
    fh = files[ref.path]
    fh.seek(ref.start + first)
    done = 0
    while done < len(view):
        got = fh.readinto(view[done:])
        if not got:
            raise CorruptModelError(
                f"{ref.path} ends inside tensor {ref.name}", hint="re-download the model"
            )
        done += got
