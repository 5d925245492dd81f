"""Export back-ends, one module per format, behind one registry.

Each back-end is a class with a ``name`` and ``export(ctx) -> list[Artifact]``. They are
imported lazily, so a missing optional dependency of one format never breaks another.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from shortgpt_export.artifacts import Artifact
from shortgpt_export.errors import UnknownFormatError
from shortgpt_export.export_options import ExportOptions
from shortgpt_export.planning import Plan
from shortgpt_export.progress import ProgressFactory, no_progress

# format name -> "module:Class"
BACKENDS: dict[str, str] = {
    "hf": "shortgpt_export.converters.hf:HFConverter",
    "gguf": "shortgpt_export.converters.gguf:GGUFConverter",
    "onnx": "shortgpt_export.converters.onnx:ONNXConverter",
}


@dataclass
class ExportContext:
    """Everything a back-end needs: the source, the plan and where to write."""

    source: object  # shortgpt_export.source.ModelSource
    plan: Plan
    out_dir: Path  # the (staging) output folder; back-ends write below it
    loaded: object | None = None  # shortgpt_export.source.LoadedModel, when in memory
    calibration: dict | None = None
    options: ExportOptions = field(default_factory=ExportOptions)
    progress: ProgressFactory = no_progress

    def write_pruned_hf(self, folder: Path) -> Path:
        """Write the pruned Hugging Face folder (streamed, or from the loaded model)."""
        from shortgpt_export.pruning import write_pruned_model

        return write_pruned_model(
            self.source,
            self.plan,
            folder,
            loaded=self.loaded,
            calibration=self.calibration,
            progress=self.progress,
        )


class Converter(Protocol):
    name: str

    def check_options(self, options: ExportOptions, source) -> None:
        """Raise on options this format cannot honour for ``source``; runs once, before the
        model is loaded (``ExportOptions.check``)."""

    def needs_model(self, source_kind: str, options: ExportOptions) -> bool:
        """Whether ``export`` needs the torch model loaded (``ctx.loaded``)."""

    def export(self, ctx: ExportContext) -> list[Artifact]: ...


def supported_formats() -> list[str]:
    return sorted(BACKENDS)


def get_converter(name: str) -> Converter:
    """An instance of the back-end for ``name``; unknown names list the supported ones."""
    target = BACKENDS.get(name.strip().lower())
    if target is None:
        raise UnknownFormatError(
            f"unknown export format {name!r}", hint=f"supported: {', '.join(supported_formats())}"
        )
    module_name, _, class_name = target.partition(":")
    return getattr(importlib.import_module(module_name), class_name)()
