"""What the export back-ends are asked for: one typed object, checked once before loading."""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass
class ExportOptions:
    """The formats to write and every back-end's options, with their defaults in one place.

    The CLI fills it from its flags (``cli/common.export_options``); ``check(source)`` runs
    each format's own checks once, before the model is loaded, so that every option error
    (a GGUF export of a pickle-only source, an impossible quant or precision) comes before
    any slow step.
    """

    formats: list[str] = field(default_factory=lambda: ["hf"])
    quants: list[str] = field(default_factory=list)  # GGUF types (default: source's or F16)
    onnx_precisions: list[str] = field(default_factory=list)  # fp32 | fp16 | int8 | int4
    int4_block_size: int = 32
    int8_mode: str = "dynamic"  # dynamic | weight-only
    converter: str = "auto"  # HF -> GGUF: auto | builtin | llama.cpp
    verify: bool = True  # check each artifact against the torch model and the tokenizer

    def __post_init__(self) -> None:
        names = self.formats.split(",") if isinstance(self.formats, str) else self.formats
        names = [n.strip().lower() for n in names if n.strip()]
        implied = [
            f for f, wanted in (("gguf", self.quants), ("onnx", self.onnx_precisions)) if wanted
        ]
        self.formats = [*names, *(f for f in implied if f not in names)] or ["hf"]
        self.backends()  # an unknown format fails here and lists the supported ones

    def backends(self) -> list:
        """The registered back-end of each format, in order."""
        from .converters import get_converter

        return [get_converter(name) for name in self.formats]

    def check(self, source) -> None:
        """Raise on any option the formats cannot honour for ``source``."""
        for backend in self.backends():
            backend.check_options(self, source)

    def needs_model(self, source) -> bool:
        """Whether any format needs the torch model in memory (verification, conversion)."""
        return any(backend.needs_model(source.kind, self) for backend in self.backends())

    def converts_from_memory(self, source) -> bool:
        """Whether a format's conversion needs the torch model in memory; verification
        aside, which runs layer by layer after layer-by-layer scoring
        (``offload.stream_logprobs``)."""
        return self.but(verify=False).needs_model(source)

    def but(self, **changes) -> ExportOptions:
        """A copy with ``changes`` (the baseline export: other formats, no verification)."""
        return replace(self, **changes)
