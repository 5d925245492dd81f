"""An Ollama ``Modelfile`` for a GGUF: the template is the one carried in the GGUF."""

from __future__ import annotations


def render_modelfile(gguf_name: str, stop_tokens: list[str], others: list[str] = ()) -> str:
    lines = [f"FROM ./{gguf_name}"]
    lines += [f'PARAMETER stop "{tok}"' for tok in stop_tokens if tok]
    lines.append("# The chat template is read from the GGUF (tokenizer.chat_template).")
    lines += [f"# Also written: ./{name}" for name in others]
    return "\n".join(lines) + "\n"


def stop_tokens_from_gguf(reader) -> list[str]:
    """The end-of-generation set named in the GGUF tokenizer metadata: EOS, end of turn
    and end of message (the source's, which every export path carries into the GGUF)."""
    from .prune_gguf import field_value

    tokens = reader.get_field("tokenizer.ggml.tokens")
    stops: list[str] = []
    for key in (
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.eom_token_id",
    ):
        index = field_value(reader, key)
        if tokens is not None and index is not None and 0 <= index < len(tokens.data):
            token = tokens.contents(index)
            if token not in stops:
                stops.append(token)
    return stops
