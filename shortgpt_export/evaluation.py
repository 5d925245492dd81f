"""Evaluation text cut into fixed, non-overlapping token windows."""

from __future__ import annotations

from .errors import CalibrationError


def eval_windows(tokenizer, text: str, *, ctx: int = 512, max_tokens: int | None = None):
    """Tokenize ``text`` once and cut it into full windows of ``ctx`` tokens ([n, ctx])."""
    import torch

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    count = len(ids) // ctx
    if count == 0:
        raise CalibrationError(
            f"evaluation text has {len(ids)} tokens, shorter than one window of {ctx}",
            hint="pass a longer text or a smaller --ctx",
        )
    return torch.tensor(ids[: count * ctx], dtype=torch.long).view(count, ctx)
