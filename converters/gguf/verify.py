"""Check a written GGUF against the torch model it came from, through llama.cpp."""

from __future__ import annotations

import logging
from pathlib import Path

from shortgpt_export.errors import ExportError
from shortgpt_export.fidelity import Fidelity, compare_logprobs
from shortgpt_export.llama_runtime import llama_logprobs, llama_model

log = logging.getLogger(__name__)


def verify_gguf(
    path: Path, reference, truth: dict | None, windows, *, min_top1: float, max_kl: float
) -> Fidelity:
    """Check the tokenizer of ``path`` against the source's ``truth`` fingerprint (in a
    subprocess, so a llama.cpp abort is an error line), then compare llama.cpp's
    log-probs with the torch ``reference``; raise unless top-1 agreement away from
    near-ties is at least ``min_top1`` and mean KL at most ``max_kl``."""
    from shortgpt_export.tokenizer_check import check_artifact

    if truth is not None:
        check_artifact(truth, path)
    with llama_model(path, n_ctx=int(windows.shape[1])) as llm:
        fidelity = compare_logprobs(reference, llama_logprobs(llm, windows))
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
