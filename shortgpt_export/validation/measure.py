"""The measurements every back-end gets: perplexity, fidelity, latency, memory."""

from __future__ import annotations

import math

import numpy as np

from .evaluators import Evaluator, PeakRss


def quality(evaluator: Evaluator, windows: np.ndarray, reference, kl_windows: int) -> dict:
    """Perplexity over ``windows`` and fidelity over the first ``kl_windows`` of them.

    ``reference`` holds the original model's float32 log-probs of the first ``kl_windows``
    windows, a row per position. Windows are compared one at a time, so memory stays at
    one window's distributions whatever ``kl_windows`` is.
    """
    import torch

    from ..fidelity import compare_logprobs

    nll, count = 0.0, 0
    kl_sum, agree_sum, rows = 0.0, 0.0, 0
    for index, window in enumerate(windows):
        logprobs = evaluator.logprobs(window)
        targets = torch.as_tensor(np.asarray(window[1:]), dtype=torch.long)
        nll -= float(logprobs[:-1].gather(1, targets[:, None]).sum())
        count += len(targets)
        if index < kl_windows:
            n = logprobs.shape[0]
            fid = compare_logprobs(np.array(reference[rows : rows + n]), logprobs.float())
            kl_sum += fid.kl_divergence * n
            agree_sum += fid.top1_agreement * n
            rows += n
    return {
        "perplexity": math.exp(nll / count),
        "kl_divergence": kl_sum / rows if rows else None,
        "top1_agreement": agree_sum / rows if rows else None,
    }


def latency(
    evaluator: Evaluator, windows: np.ndarray, *, prompt_tokens: int, gen_tokens: int, reps: int
) -> dict:
    """Prompt/generation speed and TTFT for the first ``prompt_tokens`` of the text."""
    prompt = [int(t) for t in windows[0][:prompt_tokens]]
    return evaluator.latency(prompt, gen_tokens, reps)


def measure_evaluator(
    open_evaluator,
    windows: np.ndarray,
    reference,
    *,
    kl_windows: int,
    check=None,
    qa: int | None = 0,
    **settings,
) -> dict:
    """Load an artifact with ``open_evaluator()`` and measure everything.

    Peak RSS is sampled while the model loads and generates (what running it costs);
    perplexity and KL bookkeeping hold full-vocabulary float64 arrays and come after,
    then the QA check on ``qa`` questions (all for None, none for 0).
    ``check(evaluator)`` may return an error message, which ends the measurement.
    """
    import psutil

    from .qa import qa_record

    before = psutil.Process().memory_info().rss
    evaluator = None
    try:
        with PeakRss() as rss:
            evaluator = open_evaluator()
            problem = check(evaluator) if check else None
            speed = None if problem else latency(evaluator, windows, **settings)
        if problem:
            return {"error": problem}
        return {
            **quality(evaluator, windows, reference, kl_windows),
            **speed,
            "peak_rss_bytes": rss.peak,
            "rss_growth_bytes": rss.peak - before,
            **provenance(evaluator),
            **qa_record(evaluator, qa),
        }
    finally:
        if evaluator is not None:
            evaluator.close()


def measure_accelerated(
    evaluator: Evaluator, windows: np.ndarray, reference, *, kl_windows: int, **settings
) -> dict:
    """Agreement with the reference on the KL windows, and latency, on an accelerator.

    Perplexity stays a CPU figure; the agreement check catches accelerator kernels that
    compute something other than the CPU ones.
    """
    fidelity = quality(evaluator, windows[:kl_windows], reference, kl_windows)
    del fidelity["perplexity"]  # over the KL windows only: not comparable with the CPU's
    return {**fidelity, **latency(evaluator, windows, **settings), **provenance(evaluator)}


def provenance(evaluator: Evaluator) -> dict:
    return {"backend": evaluator.version, "device": evaluator.device, "threads": evaluator.threads}
