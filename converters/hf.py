"""Pruned Hugging Face folder (safetensors), the base every other format starts from."""

from __future__ import annotations

from shortgpt_export.artifacts import Artifact

from . import ExportContext


class HFConverter:
    name = "hf"

    def check_options(self, options: dict, source=None) -> None:
        pass

    def needs_model(self, source_kind: str, options: dict) -> bool:
        return source_kind in ("gguf", "pickle")  # written from memory, not streamed

    def export(self, ctx: ExportContext) -> list[Artifact]:
        out = ctx.out_dir / "hf"
        ctx.write_pruned_hf(out)
        if ctx.options.get("verify", True):
            from shortgpt_export.tokenizer_check import check_artifact, source_fingerprint

            # tokenizer, special tokens, chat template and end of turn against the source's
            check_artifact(source_fingerprint(ctx.source), out)
        return [Artifact.written(out, "hf", None, ctx.plan)]
