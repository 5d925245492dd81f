"""Check a written GGUF against the torch model it came from, through llama.cpp."""

from __future__ import annotations

import logging
import math
from pathlib import Path

from shortgpt_export.errors import ExportError
from shortgpt_export.fidelity import Fidelity, compare_logprobs
from shortgpt_export.llama_runtime import llama_logprobs, llama_model

log = logging.getLogger(__name__)

# llama.cpp feeds F16 and quantized matrix products F16 activations: one past 65504 turns
# to inf, then NaN (measured: a tiny Mamba whose scan outputs reached 1.6e9)
NAN_HINT = (
    "llama.cpp computed NaN: usually an activation past F16's range (65504) overflowing in "
    "its F16 or quantized matrix products; an F32 file (--quant F32) avoids it"
)


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
        nan = math.isnan(fidelity.kl_divergence)
        raise ExportError(
            f"{path.name} disagrees with the torch model: top-1 agreement "
            f"{fidelity.decisive_top1_agreement:.3f} away from near-ties (need >= {min_top1}), "
            f"{fidelity.top1_agreement:.3f} overall, mean KL "
            f"{fidelity.kl_divergence:.4f} (need <= {max_kl}) over {fidelity.tokens} tokens",
            hint=NAN_HINT
            if nan
            else "report this as a bug; pass --no-verify to keep the file anyway",
        )
    return fidelity
