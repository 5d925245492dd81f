"""Typed errors. Each carries the offending value and a hint that says how to fix it.

The library raises these; the CLI turns them into one line and a non-zero exit code.
"""

from __future__ import annotations


class ShortGPTError(Exception):
    """Base class of every error the tool raises on purpose."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ModelNotFoundError(ShortGPTError):
    """The model path or hub id does not exist."""


class DefaultModelMissingError(ModelNotFoundError):
    """The built-in default model has not been fetched into the cache."""


class NotCausalLMError(ShortGPTError):
    """The model is not a decoder-only causal language model."""


class UnsupportedArchitectureError(ShortGPTError):
    """The model family is not in the architecture table."""


class UnsafeCheckpointError(ShortGPTError):
    """A pickle checkpoint was found and --allow-pickle was not given."""


class CorruptModelError(ShortGPTError):
    """A safetensors or GGUF file cannot be parsed."""


class CalibrationError(ShortGPTError):
    """The calibration text is missing, empty, too short or cannot be read."""


class PlanError(ShortGPTError):
    """The requested set of layers to remove is invalid."""


class OutputExistsError(ShortGPTError):
    """The output folder exists and --force was not given."""


class DiskFullError(ShortGPTError):
    """The disk filled up while writing; nothing partial was left behind."""


class UnknownFormatError(ShortGPTError):
    """An export format that no back-end is registered for."""


class ExportError(ShortGPTError):
    """An export back-end failed."""


class DeviceUnavailableError(ShortGPTError):
    """An accelerator was requested that this machine or back-end build does not have."""


class UnsafeOutputError(ShortGPTError):
    """The output folder overlaps an input, is the current folder, or cannot be written."""


class NonFiniteScoreError(ShortGPTError):
    """A layer score is NaN or infinite, so no ranking of the layers can be trusted."""


class ValidationError(ShortGPTError):
    """An artifact or the evaluation set-up cannot be validated."""


class QualityGateError(ShortGPTError):
    """A pruned artifact lost more perplexity than --max-ppl-increase allows."""

    exit_code = 3
