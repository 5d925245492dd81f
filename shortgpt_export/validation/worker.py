"""Evaluate one artifact in a fresh process, so its memory and speed are its own.

python -m shortgpt_export.validation.worker JOB.json  ->  one JSON line on stdout
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def evaluate(job: dict) -> dict:
    """Tokenizer check, then :func:`measure_evaluator` on the artifact in ``job``."""
    from .evaluators import SAMPLE_TEXTS, open_evaluator
    from .measure import measure_evaluator

    windows = np.load(job["windows"])
    reference = np.load(job["reference"], mmap_mode="r")
    evaluator = open_evaluator(Path(job["artifact"]), job["threads"], n_ctx=job["n_ctx"])
    try:
        for text in SAMPLE_TEXTS:
            ids = evaluator.token_ids(text)
            if ids is not None and ids != job["reference_ids"][text]:
                return {
                    "error": f"the tokenizer of {job['artifact']} splits {text[:30]!r} "
                    "differently from the reference model's"
                }
        return measure_evaluator(
            evaluator,
            windows,
            reference,
            kl_windows=job["kl_windows"],
            prompt_tokens=job["prompt_tokens"],
            gen_tokens=job["gen_tokens"],
            reps=job["reps"],
        )
    finally:
        evaluator.close()


if __name__ == "__main__":
    print(json.dumps(evaluate(json.loads(Path(sys.argv[1]).read_text()))))
