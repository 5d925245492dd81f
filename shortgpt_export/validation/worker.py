"""Evaluate one artifact in a fresh process, so its memory and speed are its own.

python -m shortgpt_export.validation.worker JOB.json  ->  one JSON line on stdout
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def evaluate(job: dict) -> dict:
    """Tokenizer check and :func:`measure_evaluator` on the artifact in ``job``, then
    :func:`measure_accelerated` on each accelerator in ``job["devices"]``."""
    from .evaluators import open_evaluator
    from .measure import measure_evaluator

    windows = np.load(job["windows"])
    reference = np.load(job["reference"], mmap_mode="r")
    settings = {k: job[k] for k in ("kl_windows", "prompt_tokens", "gen_tokens", "reps")}
    record = measure_evaluator(
        lambda: open_evaluator(Path(job["artifact"]), job["threads"], n_ctx=job["n_ctx"]),
        windows,
        reference,
        check=lambda evaluator: tokenizer_mismatch(evaluator, job),
        qa=job.get("qa", 0),
        **settings,
    )
    if "error" not in record:
        record["accelerators"] = [
            accelerated(job, device, windows, reference, settings) for device in job["devices"]
        ]
    return record


def tokenizer_mismatch(evaluator, job: dict) -> str | None:
    """Why the artifact's tokenizer differs from the reference's, or None if it does not."""
    from ..tokenizer_check import PLAIN_TEXTS

    for text in PLAIN_TEXTS:
        ids = evaluator.token_ids(text)
        if ids is not None and ids != job["reference_ids"][text]:
            return (
                f"the tokenizer of {job['artifact']} splits {text[:30]!r} "
                "differently from the reference model's"
            )
    return None


def accelerated(job: dict, device: str, windows, reference, settings: dict) -> dict:
    """One accelerator's figures, or its error: the CPU figures stand either way."""
    from ..errors import ShortGPTError
    from .evaluators import open_evaluator
    from .measure import measure_accelerated

    try:
        evaluator = open_evaluator(
            Path(job["artifact"]), job["threads"], n_ctx=job["n_ctx"], device=device
        )
        try:
            return measure_accelerated(evaluator, windows, reference, **settings)
        finally:
            evaluator.close()
    except (ShortGPTError, RuntimeError, ValueError) as exc:  # llama.cpp, ORT load failures
        return {"device": device, "error": str(exc)}


if __name__ == "__main__":
    print(json.dumps(evaluate(json.loads(Path(sys.argv[1]).read_text()))))
