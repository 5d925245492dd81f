"""Byte-level BPE pre-tokenizers that llama.cpp names in GGUF (``tokenizer.ggml.pre``).

One table serves both directions: HF -> GGUF (which name to write for a tokenizer.json)
and GGUF -> HF (transformers' GGUF tokenizer loader falls back to plain GPT-2 splitting
for some of these; we put the real pre-tokenizer back, or digits and numerals such as
"½" would be split differently from llama.cpp and from the original model).
"""

from __future__ import annotations

LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level(use_regex: bool) -> dict:
    return {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": True,
        "use_regex": use_regex,
    }


def _split(regex: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


# llama.cpp pre-tokenizer name -> tokenizer.json "pre_tokenizer" section
PRE_TOKENIZERS: dict[str, dict] = {
    "gpt-2": _byte_level(True),
    "smollm": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, _byte_level(True)]},
    "llama-bpe": {"type": "Sequence", "pretokenizers": [_split(LLAMA3_REGEX), _byte_level(False)]},
    "qwen2": {"type": "Sequence", "pretokenizers": [_split(QWEN2_REGEX), _byte_level(False)]},
}  # fmt: skip
# llama.cpp (llama-vocab.cpp) settings that follow from the pre-tokenizer name of a "gpt2"
# vocabulary: BOS added by default when tokenizer.ggml.add_bos_token is absent, and whole
# words found in the vocabulary taken as one token before any merge.
LLAMA_CPP_ADD_BOS = frozenset({"llama-bpe", "llama3", "llama-v3", "tekken", "chameleon"})
LLAMA_CPP_IGNORE_MERGES = frozenset({"llama-bpe", "llama3", "llama-v3", "tekken"})


def signature(pre: dict | None) -> tuple:
    """What decides how text is split, from a tokenizer.json ``pre_tokenizer`` section."""
    if pre is None:
        return ()
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    out: list[tuple] = []
    for step in steps:
        kind = step.get("type")
        if kind == "Split":
            out.append(("Split", step.get("pattern", {}).get("Regex")))
        elif kind == "ByteLevel":
            out.append(("ByteLevel", bool(step.get("use_regex", True))))
        elif kind == "Digits":
            out.append(("Digits", bool(step.get("individual_digits"))))
        else:
            out.append((kind,))
    return tuple(out)


def llama_cpp_name(pre: dict | None) -> str | None:
    """The llama.cpp name of a tokenizer.json pre-tokenizer, or None if it is not known."""
    wanted = signature(pre)
    return next((name for name, spec in PRE_TOKENIZERS.items() if signature(spec) == wanted), None)


def build_pre_tokenizer(step: dict):
    """A ``tokenizers`` pre-tokenizer from a tokenizer.json ``pre_tokenizer`` section."""
    from tokenizers import Regex, pre_tokenizers

    kind = step["type"]
    if kind == "Sequence":
        return pre_tokenizers.Sequence([build_pre_tokenizer(s) for s in step["pretokenizers"]])
    if kind == "ByteLevel":
        return pre_tokenizers.ByteLevel(
            add_prefix_space=step["add_prefix_space"],
            trim_offsets=step["trim_offsets"],
            use_regex=step["use_regex"],
        )
    if kind == "Digits":
        return pre_tokenizers.Digits(individual_digits=step["individual_digits"])
    if kind == "Split":
        return pre_tokenizers.Split(
            Regex(step["pattern"]["Regex"]), behavior="isolated", invert=step["invert"]
        )
    raise ValueError(f"no builder for pre-tokenizer step {kind}")


def apply_llama_cpp_pre(tokenizer, name: str | None) -> bool:
    """Give a fast HF tokenizer the pre-tokenizer llama.cpp uses for ``name``.

    Returns False (and changes nothing) when ``name`` is not in the table.
    """
    spec = PRE_TOKENIZERS.get(name or "")
    if spec is None or not getattr(tokenizer, "is_fast", False):
        return False
    tokenizer.backend_tokenizer.pre_tokenizer = build_pre_tokenizer(spec)
    return True
