"""An Ollama ``Modelfile`` for a GGUF: the template is the one carried in the GGUF."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def quote_modelfile_value(value: str) -> str | None:
    """``value`` quoted so that Ollama's Modelfile parser reads back exactly ``value``.

    Ollama has no escape character: a ``"..."`` value ends at the first line break after
    which it is a complete quoted string, and a ``\"\"\"...\"\"\"`` value may span lines but
    cannot hold ``\"\"\"``; characters that are not printable (other than tab and line
    breaks) are silently dropped by the parser. None when the value cannot be written.
    """
    if not value or any(not (c.isprintable() or c in "\t\n\r") for c in value):
        return None
    single = f'"{value}"'
    if not any(c in value for c in "\n\r") and not single.startswith('"""'):
        return single
    if '"""' not in value:
        return f'"""{value}"""'
    return None


def render_modelfile(gguf_name: str, stop_tokens: list[str], others: list[str] = ()) -> str:
    """``FROM`` the GGUF plus one ``PARAMETER stop`` per stop token that can be written
    safely; a token that cannot is left out with a warning (it could inject directives)."""
    lines = [f"FROM ./{gguf_name}"]
    for token in stop_tokens:
        quoted = quote_modelfile_value(token)
        if quoted is None:
            if token:
                log.warning("stop token %r cannot be written in a Modelfile; left out", token)
            continue
        lines.append(f"PARAMETER stop {quoted}")
    lines.append("# The chat template is read from the GGUF (tokenizer.chat_template).")
    lines += [f"# Also written: ./{name}" for name in others]
    return "\n".join(lines) + "\n"


def stop_tokens_from_gguf(path) -> list[str]:
    """The end-of-generation set named in the GGUF tokenizer metadata of ``path``: EOS, end
    of turn and end of message (the source's, which every export path carries into the
    GGUF). Read with the header walker, not ``gguf.GGUFReader`` (seconds on a large
    vocabulary)."""
    from shortgpt_export.gguf_header import read_gguf_kv

    kv = read_gguf_kv(path)
    tokens = kv.get("tokenizer.ggml.tokens")
    stops: list[str] = []
    for key in (
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.eom_token_id",
    ):
        index = kv.get(key)
        if tokens is not None and index is not None and 0 <= index < len(tokens):
            token = tokens[index]
            if token not in stops:
                stops.append(token)
    return stops
