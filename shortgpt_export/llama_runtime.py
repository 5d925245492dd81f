"""Run a GGUF file in llama.cpp (llama-cpp-python): open it, next-token log-probs.

Used by GGUF export verification and by validation alike.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path


def open_llama(path: Path, n_ctx: int, threads: int | None = None, gpu: bool = False):
    """A llama-cpp-python model with logits for every position; the caller closes it.

    ``gpu=True`` offloads every layer and the KV cache to the build's GPU back-end (Metal,
    CUDA). Otherwise nothing is offloaded, not even large-batch ops, so CPU figures stay
    CPU figures on a GPU build too.
    """
    from llama_cpp import Llama

    return Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        logits_all=True,
        verbose=False,
        n_threads=threads,
        n_batch=n_ctx,
        n_gpu_layers=-1 if gpu else 0,
        offload_kqv=gpu,
        op_offload=gpu,
    )


@contextmanager
def llama_model(path: Path, n_ctx: int, threads: int | None = None):
    """:func:`open_llama` as a context manager."""
    llm = open_llama(path, n_ctx, threads)
    try:
        yield llm
    finally:
        llm.close()


def llama_logprobs(llm, windows):
    """[n_windows * len, vocab] next-token log-probabilities from llama.cpp."""
    import numpy as np
    import torch

    rows = []
    for window in windows:
        llm.reset()
        tokens = window.tolist()
        llm.eval(tokens)
        logits = torch.from_numpy(np.array(llm.scores[: len(tokens)], dtype=np.float64))
        rows.append(torch.log_softmax(logits, dim=-1))
    return torch.cat(rows)
