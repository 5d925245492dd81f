"""shortgpt-export: remove redundant LLM layers by Block Influence and export the result."""

from .architectures import ARCHITECTURES, ArchitectureSpec, spec_for
from .errors import ShortGPTError
from .planning import Plan, make_plan
from .scoring import LayerScores, score_layers

__version__ = "0.1.0"

__all__ = [
    "ARCHITECTURES",
    "ArchitectureSpec",
    "LayerScores",
    "Plan",
    "ShortGPTError",
    "make_plan",
    "score_layers",
    "spec_for",
    "__version__",
]
