"""The Hugging Face tokenizer of a GGUF source, built from the GGUF's own tokenizer fields.

transformers' GGUF tokenizer conversion picks a converter by model architecture, not by
``tokenizer.ggml.model``: a byte-level BPE vocabulary (``gpt2``) in a ``llama`` GGUF gets a
SentencePiece-style tokenizer (byte fallback, a "▁" decoder, a step that prepends BOS), and
the EOS token is taken from the BOS id. Everything written from a GGUF source (the pruned
HF folder, and the ONNX and llama.cpp exports made from it) inherited that. This module is
the one place that corrects it: each value below names the GGUF field it comes from, the
same fields llama.cpp reads.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

from .gguf_header import read_gguf_kv

log = logging.getLogger(__name__)

# gguf.TokenType values (llama.cpp's token types)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class GGUFTokenizerMeta:
    """The ``tokenizer.*`` fields of a GGUF file, as llama.cpp reads them."""

    model: str | None  # tokenizer.ggml.model: "gpt2" (byte-level BPE), "llama" (SPM), ...
    pre: str | None  # tokenizer.ggml.pre: llama.cpp's pre-tokenizer name
    tokens: list[str]  # tokenizer.ggml.tokens
    types: list[int]  # tokenizer.ggml.token_type
    merges: list[str]  # tokenizer.ggml.merges ("a b" per merge)
    bos: int | None  # tokenizer.ggml.bos_token_id
    eos: int | None  # tokenizer.ggml.eos_token_id
    unk: int | None  # tokenizer.ggml.unknown_token_id
    pad: int | None  # tokenizer.ggml.padding_token_id
    eot: int | None  # tokenizer.ggml.eot_token_id (end of turn)
    eom: int | None  # tokenizer.ggml.eom_token_id (end of message)
    add_bos: bool | None  # tokenizer.ggml.add_bos_token; None: llama.cpp's default applies
    add_eos: bool | None  # tokenizer.ggml.add_eos_token
    chat_template: str | None  # tokenizer.chat_template
    context_length: int | None  # {arch}.context_length

    def token(self, index: int | None) -> str | None:
        return self.tokens[index] if index is not None and 0 <= index < len(self.tokens) else None

    @property
    def end_of_generation(self) -> list[int]:
        """EOS, end-of-turn and end-of-message ids named in the metadata, in that order."""
        ids: list[int] = []
        for index in (self.eos, self.eot, self.eom):
            if self.token(index) is not None and index not in ids:
                ids.append(index)
        return ids

    @property
    def adds_bos(self) -> bool:
        """Whether llama.cpp prepends BOS with add_special (the key, else its default)."""
        if self.add_bos is not None:
            return self.add_bos
        from .pretokenizers import LLAMA_CPP_ADD_BOS

        # llama.cpp: SPM/WPM vocabularies add BOS; BPE only for some pre-tokenizers
        return self.model in ("llama", "bert") or (
            self.model == "gpt2" and self.pre in LLAMA_CPP_ADD_BOS
        )

    @property
    def adds_eos(self) -> bool:
        return bool(self.add_eos) if self.add_eos is not None else self.model == "t5"


@functools.lru_cache(maxsize=8)
def _cached_meta(path: str, mtime_ns: int, size: int) -> GGUFTokenizerMeta:
    kv = read_gguf_kv(Path(path))
    arch = kv.get("general.architecture")
    add_bos, add_eos = (
        kv.get("tokenizer.ggml.add_bos_token"),
        kv.get("tokenizer.ggml.add_eos_token"),
    )
    return GGUFTokenizerMeta(
        model=kv.get("tokenizer.ggml.model"),
        pre=kv.get("tokenizer.ggml.pre"),
        tokens=kv.get("tokenizer.ggml.tokens") or [],
        types=kv.get("tokenizer.ggml.token_type") or [],
        merges=kv.get("tokenizer.ggml.merges") or [],
        bos=kv.get("tokenizer.ggml.bos_token_id"),
        eos=kv.get("tokenizer.ggml.eos_token_id"),
        unk=kv.get("tokenizer.ggml.unknown_token_id"),
        pad=kv.get("tokenizer.ggml.padding_token_id"),
        eot=kv.get("tokenizer.ggml.eot_token_id"),
        eom=kv.get("tokenizer.ggml.eom_token_id"),
        add_bos=None if add_bos is None else bool(add_bos),
        add_eos=None if add_eos is None else bool(add_eos),
        chat_template=kv.get("tokenizer.chat_template"),
        context_length=kv.get(f"{arch}.context_length") if arch else None,
    )


def read_tokenizer_meta(path: Path) -> GGUFTokenizerMeta:
    """The tokenizer fields of the GGUF file at ``path`` (cached while the file is unchanged)."""
    stat = Path(path).stat()
    return _cached_meta(str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)


def _byte_level_bpe(meta: GGUFTokenizerMeta):
    """A ``tokenizers.Tokenizer`` equal to llama.cpp's BPE tokenizer for ``meta``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    from .pretokenizers import LLAMA_CPP_IGNORE_MERGES, PRE_TOKENIZERS, build_pre_tokenizer

    vocab: dict[str, int] = {}
    for index, text in enumerate(meta.tokens):
        vocab.setdefault(text, index)
    merges = [tuple(m.split(" ", 1)) for m in meta.merges]
    # tokenizer.ggml.model == "gpt2": byte-level BPE, no byte fallback (there are no <0xNN>)
    bpe = models.BPE(
        vocab=vocab,
        merges=merges,
        byte_fallback=False,
        ignore_merges=meta.pre in LLAMA_CPP_IGNORE_MERGES,  # tokenizer.ggml.pre
    )
    tok = Tokenizer(bpe)
    spec = PRE_TOKENIZERS.get(meta.pre or "")
    if spec is None:
        log.warning(
            "GGUF pre-tokenizer %r (tokenizer.ggml.pre) is not in our table; using GPT-2 "
            "splitting, so digits and symbols may be tokenized differently from llama.cpp",
            meta.pre,
        )
        spec = PRE_TOKENIZERS["gpt-2"]
    tok.pre_tokenizer = build_pre_tokenizer(spec)
    tok.decoder = decoders.ByteLevel()  # byte-level BPE decodes bytes, not "▁" pieces
    # tokenizer.ggml.token_type: CONTROL tokens are special, USER_DEFINED ones are matched
    # in raw text like llama.cpp does; neither is normalized.
    types = meta.types or [NORMAL] * len(meta.tokens)
    added = [
        AddedToken(text, special=kind == CONTROL, normalized=False)
        for index, (text, kind) in enumerate(zip(meta.tokens, types, strict=False))
        if kind in (CONTROL, USER_DEFINED) and vocab.get(text) == index
    ]
    tok.add_special_tokens([a for a in added if a.special])
    tok.add_tokens([a for a in added if not a.special])
    # tokenizer.ggml.add_bos_token / add_eos_token: the only tokens add_special adds
    bos = meta.token(meta.bos) if meta.adds_bos else None
    eos = meta.token(meta.eos) if meta.adds_eos else None
    if bos is not None or eos is not None:

        def template(seq: str, suffix: str = "") -> list[str]:
            return [t + suffix for t in (bos,) if t] + [seq] + [t + suffix for t in (eos,) if t]

        tok.post_processor = processors.TemplateProcessing(
            single=template("$A"),
            pair=template("$A") + template("$B:1", ":1"),
            special_tokens=[(t, i) for t, i in ((bos, meta.bos), (eos, meta.eos)) if t],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False, add_prefix_space=False)
    return tok


def tokenizer_from_gguf(path: Path, converted=None):
    """The Hugging Face tokenizer of the GGUF at ``path``, with llama.cpp's semantics.

    Byte-level BPE vocabularies (``tokenizer.ggml.model == "gpt2"``) are rebuilt from the
    GGUF fields; other vocabularies keep transformers' conversion (``converted``, loaded
    when not given) with the special tokens, ``add_bos``/``add_eos`` and chat template
    set from the GGUF.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    meta = read_tokenizer_meta(path)
    if meta.model == "gpt2" and meta.tokens and meta.merges:
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=_byte_level_bpe(meta),
            bos_token=meta.token(meta.bos),  # tokenizer.ggml.bos_token_id
            eos_token=meta.token(meta.eos),  # tokenizer.ggml.eos_token_id
            unk_token=meta.token(meta.unk),  # tokenizer.ggml.unknown_token_id
            pad_token=meta.token(meta.pad),  # tokenizer.ggml.padding_token_id
            chat_template=meta.chat_template,  # tokenizer.chat_template
            model_max_length=meta.context_length or int(1e30),
            clean_up_tokenization_spaces=False,
            add_bos_token=meta.adds_bos,  # recorded for converters that read the config
            add_eos_token=meta.adds_eos,
        )
        return tokenizer
    tokenizer = converted
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(Path(path).parent, gguf_file=Path(path).name)
    _fix_converted(tokenizer, meta)
    return tokenizer


def _fix_converted(tokenizer, meta: GGUFTokenizerMeta) -> None:
    """Special tokens, add_bos/add_eos and chat template of a transformers-converted one."""
    from .pretokenizers import apply_llama_cpp_pre

    for attr, index in (
        ("bos_token", meta.bos),  # tokenizer.ggml.bos_token_id
        ("eos_token", meta.eos),  # tokenizer.ggml.eos_token_id (transformers uses the BOS id)
        ("unk_token", meta.unk),  # tokenizer.ggml.unknown_token_id
        ("pad_token", meta.pad),  # tokenizer.ggml.padding_token_id
    ):
        if meta.token(index) is not None:
            setattr(tokenizer, attr, meta.token(index))
    for attr, value in (("add_bos_token", meta.adds_bos), ("add_eos_token", meta.adds_eos)):
        if hasattr(tokenizer, attr):  # LlamaTokenizerFast rebuilds its post-processor
            setattr(tokenizer, attr, value)
    if meta.chat_template:
        tokenizer.chat_template = meta.chat_template
    if meta.pre and not apply_llama_cpp_pre(tokenizer, meta.pre):
        log.warning("GGUF pre-tokenizer %r (tokenizer.ggml.pre) is not in our table", meta.pre)


def align_model_config(model, path: Path) -> None:
    """Special-token ids of the model config and generation config from the GGUF fields.

    The generation config's ``eos_token_id`` lists every end-of-generation id (EOS,
    end-of-turn, end-of-message), so generation stops where llama.cpp stops.
    """
    meta = read_tokenizer_meta(path)
    eog = meta.end_of_generation
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is None:
            continue
        if meta.token(meta.bos) is not None:
            config.bos_token_id = meta.bos  # tokenizer.ggml.bos_token_id
        if meta.token(meta.pad) is not None:
            config.pad_token_id = meta.pad  # tokenizer.ggml.padding_token_id
        if eog:
            # eos/eot/eom_token_id; the model config keeps the single EOS
            config.eos_token_id = eog if config is not model.config and len(eog) > 1 else eog[0]
