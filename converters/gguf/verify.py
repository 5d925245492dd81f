"""Check a written GGUF against the torch model it came from, through llama.cpp."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

from shortgpt_export.errors import ExportError
from shortgpt_export.fidelity import Fidelity, compare_logprobs

log = logging.getLogger(__name__)

# (top-1 agreement at least, mean KL at most) against the torch model. Quantized files
# only get a KL bound: a broken file (wrong layer order, wrong rope layout) is off by
# several nats, while quantization noise on near-tied tokens can flip top-1 freely.
EXACT_BOUNDS = (0.99, 0.01)
QUANTIZED_BOUNDS = (0.0, 1.0)


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


def verify_gguf(path: Path, reference, truth: dict | None, windows, *, exact: bool) -> Fidelity:
    """Check the tokenizer of ``path`` against the source's ``truth`` fingerprint (in a
    subprocess, so a llama.cpp abort is an error line), then compare llama.cpp's
    log-probs with the torch ``reference``; raise on a mismatch."""
    from shortgpt_export.tokenizer_check import check_artifact

    if truth is not None:
        check_artifact(truth, path)
    with llama_model(path, n_ctx=int(windows.shape[1])) as llm:
        fidelity = compare_logprobs(reference, llama_logprobs(llm, windows))
    min_top1, max_kl = EXACT_BOUNDS if exact else QUANTIZED_BOUNDS
    log.info("%s: KL %.5f, top-1 %.3f", path.name, fidelity.kl_divergence, fidelity.top1_agreement)
    # written so that NaN (a file llama.cpp computes NaN with) fails too
    if not (fidelity.decisive_top1_agreement >= min_top1 and fidelity.kl_divergence <= max_kl):
        raise ExportError(
            f"{path.name} disagrees with the torch model: top-1 agreement "
            f"{fidelity.decisive_top1_agreement:.3f} away from near-ties (need >= {min_top1}), "
            f"{fidelity.top1_agreement:.3f} overall, mean KL "
            f"{fidelity.kl_divergence:.4f} (need <= {max_kl}) over {fidelity.tokens} tokens",
            hint="report this as a bug; pass --no-verify to keep the file anyway",
        )
    return fidelity
