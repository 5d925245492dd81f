"""GGUF metadata arrays packed without a Python-level loop over their items.

The tokenizer's token list and merges are ~100k short strings; gguf-py packs them one
``struct.pack`` call at a time (about a second per model). Here strings are joined into one
text (or kept as one), encoded in one call, and numpy finds each string's byte length from
the separators and interleaves the lengths with the bytes; numbers are packed in one
``struct.pack`` call. :func:`fast_writer_class` is the ``gguf.GGUFWriter`` that does so.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

SEPARATOR = "\x00"  # one byte in UTF-8
# gguf.GGUFValueType -> struct code, and the Python types gguf-py packs as each
NUMBER_CODES = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q",
                11: "q", 12: "d"}  # fmt: skip
NUMBER_ITEMS = {6: {float, int}, 12: {float, int}, 7: {bool}}  # the rest: ints, no bools


class PackedStrings(Sequence):
    """A string array held as one text, the strings joined by ``SEPARATOR`` (which none of
    them contains). Indexing splits the text once; packing never does."""

    def __init__(self, text: str, count: int):
        self.text, self.count = text, count
        self._items: list[str] | None = None

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index):
        if self._items is None:
            self._items = self.text.split(SEPARATOR) if self.count else []
        return self._items[index]

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    __hash__ = None


def joined_pairs(pairs: list, space: str) -> PackedStrings | None:
    """``[[a, b], ...]`` string pairs as the strings ``"a b"``, spaces inside a part
    replaced by ``space``; None unless every item is a list of two strings free of
    ``SEPARATOR``."""
    import numpy as np

    if set(map(type, pairs)) != {list} or set(map(len, pairs)) != {2}:
        return None
    parts = list(chain.from_iterable(pairs))
    if set(map(type, parts)) != {str}:
        return None
    text = SEPARATOR.join(parts)
    if text.count(SEPARATOR) != len(parts) - 1:
        return None
    raw = np.frombuffer(text.replace(" ", space).encode("utf-8"), dtype=np.uint8).copy()
    cuts = np.flatnonzero(raw == ord(SEPARATOR))
    raw[cuts[0::2]] = ord(" ")  # a SEPARATOR b SEPARATOR c ... -> "a b" SEPARATOR "c d" ...
    return PackedStrings(raw.tobytes().decode("utf-8"), len(pairs))


def pack_strings(strings, order: str) -> bytes:
    """GGUF string array body: each string's UTF-8 byte length (uint64, ``order`` "<" or
    ">") then its bytes. A separator inside a string falls back to one encode per string."""
    import numpy as np

    count = len(strings)
    text = strings.text if isinstance(strings, PackedStrings) else SEPARATOR.join(strings)
    if isinstance(strings, PackedStrings) or text.count(SEPARATOR) == count - 1:
        raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        cuts = np.flatnonzero(raw == ord(SEPARATOR))
        lengths = np.diff(cuts, prepend=-1, append=raw.size) - 1
        blob = np.delete(raw, cuts)
    else:
        encoded = list(map(str.encode, strings))
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=count)
        blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    body = np.empty(8 * count + blob.size, dtype=np.uint8)
    prefix = np.arange(count) * 8 + np.cumsum(lengths) - lengths  # where each length goes
    prefix_bytes = (prefix[:, None] + np.arange(8)).ravel()
    body[prefix_bytes] = lengths.astype(f"{order}u8").view(np.uint8)
    text_bytes = np.ones(body.size, dtype=bool)
    text_bytes[prefix_bytes] = False
    body[text_bytes] = blob
    return body.tobytes()


def fast_writer_class():
    """``gguf.GGUFWriter`` that packs each metadata array of two or more strings or numbers
    in one call; the bytes written are the same."""
    import gguf

    class FastGGUFWriter(gguf.GGUFWriter):
        def _pack_val(self, val, vtype, add_vtype, sub_type=None):
            packed = None
            if vtype == gguf.GGUFValueType.ARRAY and isinstance(val, (list, tuple, PackedStrings)):
                order = "<" if self.endianess == gguf.GGUFEndian.LITTLE else ">"
                packed = packed_array(val, sub_type, order)
            if packed is None:
                return super()._pack_val(val, vtype, add_vtype, sub_type)
            head = self._pack("I", vtype) if add_vtype else b""
            return head + packed

    return FastGGUFWriter


def packed_array(values, item_type, order: str) -> bytes | None:
    """A GGUF array's item type, count and items, as ``gguf.GGUFWriter`` packs them, for
    two or more strings or numbers of one type (``item_type`` None: inferred as gguf-py
    does); None for anything else (nested arrays, mixed items, numpy integers), which
    gguf-py packs."""
    import struct

    import gguf

    vt = gguf.GGUFValueType
    if len(values) < 2:
        return None
    kinds = {str} if isinstance(values, PackedStrings) else set(map(_base, set(map(type, values))))
    if item_type is None:  # what GGUFValueType.get_type gives for every item
        item_type = {str: vt.STRING, int: vt.INT32, float: vt.FLOAT32, bool: vt.BOOL}.get(
            next(iter(kinds)) if len(kinds) == 1 else None
        )
    if item_type == vt.STRING and kinds == {str}:
        body = pack_strings(values, order)
    elif item_type in NUMBER_CODES and kinds <= NUMBER_ITEMS.get(item_type, {int}):
        body = struct.pack(f"{order}{len(values)}{NUMBER_CODES[item_type]}", *values)
    else:
        return None
    return struct.pack(f"{order}IQ", item_type, len(values)) + body


def _base(kind: type) -> type:
    """The Python type whose packing items of ``kind`` share (enum members are ints,
    numpy's float64 a float), bool before int; other types as they are."""
    return next((base for base in (bool, int, float, str) if issubclass(kind, base)), kind)
