"""Pruned Hugging Face folder (safetensors), the base every other format starts from."""

from __future__ import annotations

from shortgpt_export.artifacts import Artifact
from shortgpt_export.export_options import ExportOptions

from . import ExportContext


class HFConverter:
    name = "hf"

    def check_options(self, options: ExportOptions, source) -> None:
        pass  # a pruned folder can be written from any source the loader accepts

    def needs_model(self, source_kind: str, options: ExportOptions) -> bool:
        # safetensors and GGUF sources are written one tensor at a time (pruning.py)
        return source_kind == "pickle"

    def export(self, ctx: ExportContext) -> list[Artifact]:
        out = ctx.out_dir / "hf"
        ctx.write_pruned_hf(out)
        if ctx.options.verify:
            from shortgpt_export.tokenizer_check import check_artifact, source_fingerprint

            # tokenizer, special tokens, chat template and end of turn against the source's
            check_artifact(source_fingerprint(ctx.source), out)
        return [Artifact.written(out, "hf", None, ctx.plan)]
