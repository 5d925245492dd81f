"""Perplexity of a torch causal LM on fixed, non-overlapping token windows."""

from __future__ import annotations

import math

from .errors import CalibrationError
from .progress import ProgressFactory, no_progress


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


def torch_perplexity(
    model, windows, *, batch_size: int = 1, progress: ProgressFactory = no_progress
) -> float:
    """exp(mean next-token negative log-likelihood) over every predicted token."""
    import torch

    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.inference_mode(), progress("perplexity", windows.shape[0]) as advance:
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start : start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits.float()
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                batch[:, 1:].reshape(-1),
                reduction="sum",
            )
            total += float(nll)
            count += batch[:, 1:].numel()
            advance(batch.shape[0])
    return math.exp(total / count)
