"""GGUF string arrays packed without a Python-level loop over the strings.

The tokenizer's token list and merges are ~100k short strings; gguf-py packs them one
``struct.pack`` call at a time. Here they are joined into one text (or kept as one),
encoded in one call, and numpy finds each string's byte length from the separators and
interleaves the lengths with the bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

SEPARATOR = "\x00"  # one byte in UTF-8


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
