"""Hugging Face tokenizer files -> GGUF tokenizer metadata."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Sequence
from operator import methodcaller
from pathlib import Path

from shortgpt_export.errors import ExportError
from shortgpt_export.pretokenizers import llama_cpp_name, signature

from .packing import joined_pairs

log = logging.getLogger(__name__)

SLIMMED = ("vocab", "merges")  # the parts of tokenizer.json's model SpecialVocab never reads


def add_tokenizer(writer, folder: Path, vocab_size: int) -> None:
    """Tokens, types, merges, pre-tokenizer, special ids and chat template into ``writer``."""
    import gguf

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ExportError(
            f"{folder} has no tokenizer.json (only byte-level BPE tokenizers are converted)",
            hint="set LLAMA_CPP_DIR and pass --converter llama.cpp",
        )
    data = read_json(path)
    model = data.get("model", {})
    # C-level scans (filter, map, zip, set) over the ~50k-100k entries: a Python-level
    # loop per token costs tens of milliseconds each, most of a small model's export
    vocab = model.get("vocab", {})
    byte_tokens = "<0x" in "\n".join(vocab) and any(
        t.endswith(">") for t in filter(methodcaller("startswith", "<0x"), vocab)
    )
    if model.get("type") != "BPE" or byte_tokens:
        # SentencePiece-style vocabularies (byte tokens <0xNN>) need llama.cpp's converter
        raise ExportError(
            f"tokenizer of type {model.get('type')}"
            + (" with <0xNN> byte tokens" if byte_tokens else "")
            + " is not supported by the built-in converter (byte-level BPE only)",
            hint="set LLAMA_CPP_DIR and pass --converter llama.cpp",
        )
    pre = llama_cpp_name(data.get("pre_tokenizer"))
    if pre is None:
        raise ExportError(
            f"pre-tokenizer {signature(data.get('pre_tokenizer'))} is not one llama.cpp is known "
            "to reproduce",
            hint="set LLAMA_CPP_DIR and pass --converter llama.cpp",
        )
    token_list, token_types = token_arrays(
        model["vocab"], data.get("added_tokens", []), vocab_size, path
    )
    size = len(token_list)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(token_list)
    writer.add_token_types(token_types)
    merges = merge_strings(model.get("merges"))
    # gguf's own merge parsing walks every character in Python (most of the export time
    # of a small model); the merges parsed above are the same strings
    if merges is None:
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=size)
    else:
        special = _special_vocab(folder, data, size)
        special.merges, special.load_merges = merges, True
    special.add_to_gguf(writer, quiet=True)
    eos = special.special_token_ids.get("eos")
    for key, index in end_of_generation_extras(folder, eos, size).items():
        getattr(writer, f"add_{key}_token_id")(index)
    log.info("tokenizer: %d tokens, pre-tokenizer %s, %d merges", size, pre, len(special.merges))


def read_json(path: Path):
    """A JSON file parsed by orjson (about half the time of ``json`` for a tokenizer.json
    of a few MB, read as bytes with no separate decode); ``json`` where orjson refuses a
    file the standard parser accepts (NaN, Infinity)."""
    import orjson

    raw = path.read_bytes()
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw.decode("utf-8"))


def token_arrays(
    vocab: dict, added_tokens: list, vocab_size: int, path: Path
) -> tuple[list[str], list[int]]:
    """GGUF's token list and token types, ids 0 .. size - 1 (size at least ``vocab_size``):
    the vocabulary's tokens NORMAL, added tokens CONTROL (special) or USER_DEFINED over
    them, ids without a token ``[PADi]`` and UNUSED."""
    import gguf
    import numpy as np

    added_ids = [a.get("id") for a in added_tokens]
    # ids size the token arrays: bound them by the vocabulary
    limit = max(vocab_size, len(vocab) + len(added_tokens))
    ids = list(vocab.values())
    # the usual layout: tokens in id order, none missing (and ints: 1.0 == 1 in Python)
    in_order = ids == list(range(len(ids))) and set(map(type, ids)) <= {int}
    checked = added_ids if in_order else ids + added_ids
    if set(map(type, checked)) - {int} or (
        checked and not 0 <= min(checked) <= max(checked) < limit
    ):
        bad = [i for i in checked if type(i) is not int or not 0 <= i < limit]
        if bad:
            raise ExportError(
                f"{path} has token ids outside the vocabulary of {limit} ({bad[0]!r})",
                hint="re-save the tokenizer",
            )
    known = len(ids) if in_order else max(ids, default=-1) + 1
    size = max(vocab_size, known, max(added_ids, default=-1) + 1)
    types = np.full(size, gguf.TokenType.UNUSED, dtype=np.int32)
    if in_order:
        token_list = list(vocab) + [f"[PAD{i}]" for i in range(len(ids), size)]
        types[: len(ids)] = gguf.TokenType.NORMAL
    else:
        tokens = dict(zip(ids, vocab, strict=True))
        token_list = [tokens.get(i, f"[PAD{i}]") for i in range(size)]
        types[ids] = gguf.TokenType.NORMAL
    for added in added_tokens:
        token_list[added["id"]] = added["content"]
        types[added["id"]] = (
            gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
        )
    return token_list, types.tolist()


def _special_vocab(folder: Path, data: dict, size: int):
    """``gguf.SpecialVocab(folder)`` (special ids, add-BOS/EOS flags, chat template) without
    parsing tokenizer.json a second time.

    SpecialVocab reads the folder's files itself; it is pointed at a temporary folder that
    links every file of ``folder`` but tokenizer.json, which is written there without the
    model's vocabulary and merges (the only parts it does not read when not loading
    merges). Where links cannot be made, the source folder is read as it is.
    """
    import gguf

    slim = {**data, "model": {k: v for k, v in data["model"].items() if k not in SLIMMED}}
    try:
        with tempfile.TemporaryDirectory(prefix="shortgpt-vocab-", dir=_memory_tmp()) as tmp:
            view = Path(tmp)
            for entry in folder.iterdir():
                if entry.name != "tokenizer.json":
                    (view / entry.name).symlink_to(entry.resolve())
            (view / "tokenizer.json").write_text(json.dumps(slim), encoding="utf-8")
            return gguf.SpecialVocab(view, load_merges=False, n_vocab=size)
    except OSError as exc:  # no symlinks on this file system
        log.debug("reading %s as it is (%s)", folder, exc)
        return gguf.SpecialVocab(folder, load_merges=False, n_vocab=size)


def _memory_tmp() -> str | None:
    """/dev/shm where it is a writable folder (Linux): creating and deleting a few files
    there costs microseconds, against ~15 ms on an ext4 disk mounted with ``discard``."""
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None


def merge_strings(merges) -> Sequence[str] | None:
    """tokenizer.json merges as GGUF's ``"a b"`` strings (spaces in a part become U+0120,
    as gguf.SpecialVocab writes them); None when absent or in another format."""
    if not isinstance(merges, list) or not merges:
        return None
    if isinstance(merges[0], str):
        return merges if all(isinstance(m, str) for m in merges) else None
    space = chr(0x120)
    packed = joined_pairs(merges, space)  # no Python-level loop over the pairs
    if packed is not None:
        return packed
    try:
        return [f"{a.replace(' ', space)} {b.replace(' ', space)}" for a, b in merges]
    except (TypeError, ValueError, AttributeError):  # not [a, b] string pairs
        return None


def end_of_generation_extras(folder: Path, eos: int | None, size: int) -> dict[str, int]:
    """``{"eot": id, "eom": id}`` from the ids of generation_config.json's ``eos_token_id``
    list other than the tokenizer's EOS, so llama.cpp and Ollama stop where the source does."""
    path = folder / "generation_config.json"
    if not path.is_file():
        return {}
    value = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    ids = value if isinstance(value, list) else [value]
    extras = [i for i in ids if isinstance(i, int) and i != eos and 0 <= i < size]
    return dict(zip(("eot", "eom"), extras, strict=False))
