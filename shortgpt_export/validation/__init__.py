"""Validate artifacts: perplexity, agreement with the original model, size, latency and
exact-match accuracy on built-in questions asked in chat (``qa``).

The evaluation text is tokenized once with the reference model's tokenizer; the same ids
go to torch, llama.cpp and onnxruntime. The reference (original, unpruned) model's
log-probabilities are computed once and cached on disk, keyed by the model's resolved
path, the size and mtime of its weight files, its dtype and the evaluation tokens.
"""

from __future__ import annotations

from ..errors import QualityGateError, ValidationError
from .reference import EvalOptions
from .session import check_quality_gate, measure_artifacts, validate_artifacts

__all__ = [
    "EvalOptions",
    "QualityGateError",
    "ValidationError",
    "check_quality_gate",
    "measure_artifacts",
    "validate_artifacts",
]
