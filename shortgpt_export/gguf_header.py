"""Bounds check of a GGUF file's header before any parser (gguf-py, transformers) sees it.

Every count and length the header declares is checked against the bytes left in the file
(a count times the smallest possible item cannot exceed them), so a file of a few dozen
bytes that claims billions of keys, tensors or array items is refused at once instead of
making a parser allocate gigabytes. Tensor entries are checked to lie inside the file.
"""

from __future__ import annotations

import math
import mmap
import struct
from array import array
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CorruptModelError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_NESTING = 2
DEFAULT_ALIGNMENT = 32
# GGUF value types: id -> (struct code, size); 8 is string, 9 is array.
SCALARS = {
    0: ("B", 1), 1: ("b", 1), 2: ("H", 2), 3: ("h", 2), 4: ("I", 4), 5: ("i", 4),
    6: ("f", 4), 7: ("?", 1), 10: ("Q", 8), 11: ("q", 8), 12: ("d", 8),
}  # fmt: skip
STRING, ARRAY = 8, 9
MIN_TENSOR_INFO = 8 + 4 + 4 + 8  # empty name, n_dims, type, offset


class _Bad(Exception):
    pass


class _Cursor:
    def __init__(self, data, endian: str):
        self.data, self.pos, self.endian = data, 0, endian

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def need(self, n: int, what: str) -> None:
        if n > self.left:
            raise _Bad(f"{what} needs {n} bytes at offset {self.pos} but only {self.left} remain")

    def unpack(self, code: str, size: int, what: str):
        self.need(size, what)
        (value,) = struct.unpack_from(self.endian + code, self.data, self.pos)
        self.pos += size
        return value

    def count(self, what: str, min_item: int):
        """A u64 count whose items, at ``min_item`` bytes each, must fit in what is left."""
        n = self.unpack("Q", 8, what)
        if n * min_item > self.left:
            raise _Bad(
                f"{what} is {n}, which needs at least {n * min_item} bytes but "
                f"only {self.left} remain"
            )
        return n

    def string(self, what: str) -> bytes:
        n = self.count(f"length of {what}", 1)
        raw = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return raw


def _string_starts(cur: _Cursor, n: int, what: str, *, keep: bool = True) -> array:
    """Where each of ``n`` length-prefixed strings starts (its length), every bound
    checked; the cursor moves past them (a tight loop: vocabularies hold ~10^5 strings).
    Without ``keep`` nothing is collected (a hostile count allocates nothing)."""
    data, pos, end = cur.data, cur.pos, len(cur.data)
    length_at = struct.Struct(cur.endian + "Q").unpack_from
    starts = array("q")  # 8 bytes per string, not a Python int each
    note = starts.append if keep else _ignore
    for i in range(n):
        if pos + 8 > end:
            cur.pos = pos
            cur.need(8, f"length of {what}[{i}]")
        note(pos)
        (length,) = length_at(data, pos)
        pos += 8 + length
        if pos > end:
            raise _Bad(
                f"length of {what}[{i}] is {length}, which needs at least {length} bytes "
                f"but only {end - pos + length} remain"
            )
    cur.pos = pos
    return starts


def _ignore(_position: int) -> None:
    pass


def _decode(raw, what: str, strict: bool) -> str:
    if not strict:
        return raw.decode("utf-8", errors="replace")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _Bad(f"{what} is not valid UTF-8") from None


def _read_strings(cur: _Cursor, n: int, what: str, strict: bool) -> list[str]:
    """``n`` length-prefixed strings, decoded; ``strict``: invalid UTF-8 is an error instead
    of being replaced.

    The strings are decoded in one call: numpy drops each 8-byte length and puts a NUL
    between strings, and the text is split at the NULs. Where a string holds a NUL itself
    or is not valid UTF-8, each is decoded on its own (replacing, or naming the bad one).
    """
    import numpy as np

    first = cur.pos
    starts = _string_starts(cur, n, what)
    if not starts:
        return []
    raw = np.frombuffer(cur.data, dtype=np.uint8, count=cur.pos - first, offset=first).copy()
    at = np.frombuffer(starts, dtype=np.int64) - first
    keep = np.ones(raw.size, dtype=bool)
    for k in range(1, 8):
        keep[at + k] = False
    keep[at[:1]] = False  # the first byte of each later length becomes the separator
    raw[at[1:]] = 0
    blob = raw[keep].tobytes()
    if blob.count(0) == n - 1:
        try:
            return blob.decode("utf-8").split("\x00")
        except UnicodeDecodeError:
            pass
    return _decode_each(cur, starts, what, strict)


def _decode_each(cur: _Cursor, starts, what: str, strict: bool) -> list[str]:
    length_at = struct.Struct(cur.endian + "Q").unpack_from
    out = []
    for i, pos in enumerate(starts):
        (length,) = length_at(cur.data, pos)
        out.append(_decode(cur.data[pos + 8 : pos + 8 + length], f"{what}[{i}]", strict))
    return out


def _value(cur: _Cursor, vtype: int, what: str, *, keep: bool, strict: bool, depth: int = 0):
    """Step over one value of ``vtype`` with every bound checked; return it when ``keep``
    (scalars always: general.alignment is needed either way). Skipping decodes nothing,
    which keeps the check fast on a vocabulary of ~10^5 strings."""
    if vtype in SCALARS:
        return cur.unpack(*SCALARS[vtype], what)
    if vtype == STRING:
        raw = cur.string(what)
        return _decode(raw, what, strict) if keep else None
    if vtype != ARRAY:
        raise _Bad(f"{what} has unknown value type {vtype}")
    if depth >= MAX_ARRAY_NESTING:
        raise _Bad(f"{what} nests arrays deeper than {MAX_ARRAY_NESTING} levels")
    item_type = cur.unpack("I", 4, f"item type of {what}")
    if item_type in SCALARS:
        code, size = SCALARS[item_type]
        n = cur.count(f"item count of {what}", size)
        values = (
            list(struct.unpack_from(f"{cur.endian}{n}{code}", cur.data, cur.pos)) if keep else None
        )
        cur.pos += n * size
        return values
    if item_type == STRING:
        n = cur.count(f"item count of {what}", 8)
        if keep:
            return _read_strings(cur, n, what, strict)
        _string_starts(cur, n, what, keep=False)
        return None
    if item_type == ARRAY:
        n = cur.count(f"item count of {what}", 12)
        items = [
            _value(cur, ARRAY, f"{what}[{i}]", keep=keep, strict=strict, depth=depth + 1)
            for i in range(n)
        ]
        return items if keep else None
    raise _Bad(f"{what} has unknown item type {item_type}")


@dataclass
class HeaderLayout:
    """What a full parse of a GGUF header found: every key with its value and value types,
    every tensor's entry, and where the data section starts."""

    endian: str  # "<" or ">"
    alignment: int = DEFAULT_ALIGNMENT
    data_start: int = 0
    fields: list[tuple[str, object, int, int | None]] = field(default_factory=list)
    tensors: list[tuple[str, list[int], int, int]] = field(default_factory=list)


def _check(data, size: int, *, keep: bool = False, strict: bool = False) -> HeaderLayout:
    """Check the whole header and collect every tensor's (name, dims in ggml order, ggml
    type, offset); ``keep`` also collects every key's (name, value, type, item type).
    ``strict`` refuses strings that are not UTF-8 instead of replacing their bytes."""
    if size < 4 or bytes(data[:4]) != MAGIC:
        raise _Bad("the file does not start with the GGUF magic")
    version = struct.unpack_from("<I", data, 4)[0] if size >= 8 else None
    endian = "<"
    if version is not None and version & 0xFFFF == 0:  # written big-endian
        endian, version = ">", struct.unpack_from(">I", data, 4)[0]
    if version not in VERSIONS:
        raise _Bad(f"GGUF version {version} is not supported (only {VERSIONS})")
    layout = HeaderLayout(endian)
    cur = _Cursor(data, endian)
    cur.pos = 8
    n_tensors = cur.unpack("Q", 8, "tensor count")
    n_kv = cur.count("key/value count", 8 + 4 + 1)
    if n_tensors * MIN_TENSOR_INFO > cur.left:
        raise _Bad(f"tensor count {n_tensors} does not fit in the {cur.left} bytes left")
    keys: set[bytes] = set()
    for index in range(n_kv):
        key = cur.string(f"key #{index}")
        try:
            name = key.decode("utf-8")
        except UnicodeDecodeError:
            raise _Bad(f"key #{index} is not UTF-8") from None
        if key in keys:
            raise _Bad(f"key {name!r} appears twice")
        keys.add(key)
        vtype = cur.unpack("I", 4, f"value type of {name!r}")
        item_type = None
        if vtype == ARRAY and cur.left >= 4:  # _value checks it; kept for the writer
            (item_type,) = struct.unpack_from(endian + "I", data, cur.pos)
        value = _value(cur, vtype, f"value of {name!r}", keep=keep, strict=strict)
        if keep:
            layout.fields.append((name, value, vtype, item_type))
        if name == "general.alignment":
            if not isinstance(value, int) or value <= 0 or value & (value - 1):
                raise _Bad(f"general.alignment {value!r} is not a power of two")
            layout.alignment = value
    if n_tensors * MIN_TENSOR_INFO > cur.left:
        raise _Bad(f"tensor count {n_tensors} does not fit in the {cur.left} bytes left")
    infos = []
    names: set[bytes] = set()
    for index in range(n_tensors):
        name = cur.string(f"name of tensor #{index}")
        if name in names:
            raise _Bad(f"tensor {name[:80]!r} appears twice")
        names.add(name)
        n_dims = cur.unpack("I", 4, f"dimension count of tensor #{index}")
        if n_dims > MAX_DIMS:
            raise _Bad(f"tensor #{index} has {n_dims} dimensions (at most {MAX_DIMS})")
        dims = [cur.unpack("Q", 8, f"shape of tensor #{index}") for _ in range(n_dims)]
        ggml_type = cur.unpack("I", 4, f"type of tensor #{index}")
        offset = cur.unpack("Q", 8, f"offset of tensor #{index}")
        infos.append((index, dims, ggml_type, offset))
        label = _decode(name, f"name of tensor #{index}", strict)
        layout.tensors.append((label, dims, ggml_type, offset))
    layout.data_start = -(-cur.pos // layout.alignment) * layout.alignment
    _check_tensor_data(infos, size - layout.data_start, layout.alignment)
    return layout


def _check_tensor_data(infos, data_bytes: int, alignment: int) -> None:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    for index, dims, ggml_type, offset in infos:
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            raise _Bad(f"tensor #{index} has unknown type {ggml_type}") from None
        elements = math.prod(dims)
        if dims and dims[0] % block:
            raise _Bad(f"tensor #{index} has {dims[0]} columns, not a multiple of {block}")
        nbytes = elements // block * type_size
        if offset % alignment or offset + nbytes > data_bytes:
            raise _Bad(
                f"tensor #{index} spans bytes {offset}..{offset + nbytes} of a data "
                f"section of {max(data_bytes, 0)} bytes"
            )


def check_gguf_header(path: Path) -> None:
    """Raise :class:`CorruptModelError` unless the GGUF header of ``path`` fits in the file."""
    _parse(Path(path))


def parse_gguf_header(path: Path) -> HeaderLayout:
    """Every key (value and types) and tensor entry of a GGUF file, checked, in one pass;
    strings must be UTF-8. See :class:`shortgpt_export.gguf_file.GGUFFile`."""
    return _parse(Path(path), keep=True, strict=True)


def read_gguf_kv(path: Path) -> dict:
    """Every metadata key/value of a GGUF file (no tensor data), the header checked in the
    same pass; bytes that are not UTF-8 are replaced.

    gguf.GGUFReader maps every string of a 49k-token vocabulary to its own numpy view,
    which takes seconds; this reads the key/value section in one pass.
    """
    return {name: value for name, value, *_ in _parse(Path(path), keep=True).fields}


def read_gguf_tensor_shapes(path: Path) -> dict[str, list[int]]:
    """Every tensor's dimensions (ggml order) by name, the header checked in the same pass;
    no ``gguf.GGUFReader`` (see :func:`read_gguf_kv`)."""
    return {name: dims for name, dims, *_ in _parse(Path(path)).tensors}


def _parse(path: Path, *, keep: bool = False, strict: bool = False) -> HeaderLayout:
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            if size == 0:
                raise _Bad("the file is empty")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return _check(data, size, keep=keep, strict=strict)
    except _Bad as exc:
        raise CorruptModelError(
            f"cannot read GGUF file {path}: {exc}",
            hint="the file is truncated or damaged; re-download or re-export it",
        ) from None
