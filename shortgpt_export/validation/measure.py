"""The measurements every back-end gets: perplexity, fidelity, latency, peak RSS."""

from __future__ import annotations

import math

import numpy as np

from .evaluators import Evaluator, PeakRss


def measure_evaluator(
    evaluator: Evaluator,
    windows: np.ndarray,
    reference,
    *,
    kl_windows: int,
    prompt_tokens: int,
    gen_tokens: int,
    reps: int,
) -> dict:
    """Run ``evaluator`` over ``windows`` (and a latency test), sampling RSS throughout.

    ``reference`` holds the original model's float32 log-probs of the first
    ``kl_windows`` windows, row per position.
    """
    import torch

    with PeakRss() as rss:
        nll, count, candidates = 0.0, 0, []
        for index, window in enumerate(windows):
            logprobs = evaluator.logprobs(window)
            targets = torch.as_tensor(np.asarray(window[1:]), dtype=torch.long)
            nll -= float(logprobs[:-1].gather(1, targets[:, None]).sum())
            count += len(targets)
            if index < kl_windows:
                candidates.append(logprobs.float())
        fidelity = against_reference(candidates, reference)
        prompt = [int(t) for t in windows[0][:prompt_tokens]]
        latency = evaluator.latency(prompt, gen_tokens, reps)
    return {
        "perplexity": math.exp(nll / count),
        **fidelity,
        **latency,
        "peak_rss_bytes": rss.peak,
        **provenance(evaluator),
    }


def measure_accelerated(
    evaluator: Evaluator,
    windows: np.ndarray,
    reference,
    *,
    kl_windows: int,
    prompt_tokens: int,
    gen_tokens: int,
    reps: int,
) -> dict:
    """Agreement with the reference on the KL windows, and latency, on an accelerator.

    Perplexity stays a CPU figure; the agreement check catches accelerator kernels that
    compute something else than the CPU ones.
    """
    candidates = [evaluator.logprobs(window).float() for window in windows[:kl_windows]]
    prompt = [int(t) for t in windows[0][:prompt_tokens]]
    return {
        **against_reference(candidates, reference),
        **evaluator.latency(prompt, gen_tokens, reps),
        **provenance(evaluator),
    }


def against_reference(candidates: list, reference) -> dict:
    """Mean KL and top-1 agreement of ``candidates`` (log-prob rows) against the reference."""
    import torch

    from ..fidelity import compare_logprobs

    rows = sum(c.shape[0] for c in candidates)
    fidelity = compare_logprobs(torch.from_numpy(np.array(reference[:rows])), torch.cat(candidates))
    return {"kl_divergence": fidelity.kl_divergence, "top1_agreement": fidelity.top1_agreement}


def provenance(evaluator: Evaluator) -> dict:
    return {"backend": evaluator.version, "device": evaluator.device, "threads": evaluator.threads}
