"""GGUF export: prune (GGUF source) or convert (safetensors source), quantize, verify."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from shortgpt_export.artifacts import Artifact
from shortgpt_export.errors import ExportError
from shortgpt_export.export_options import ExportOptions
from shortgpt_export.fidelity import QUANTIZED_MAX_KL
from shortgpt_export.model_card import render_model_card

from .. import ExportContext
from .attention_pattern import add_pattern, check_plan, pattern_key, warn_full_attention
from .healed_precision import healed_tensor_names, keep_healed_precise
from .modelfile import render_modelfile, stop_tokens_from_gguf
from .moe_layers import check_dense_layers
from .prune_gguf import prune_gguf
from .quantize import QUANT_TYPES, QuantType, parse_quant_list, quantize_gguf

log = logging.getLogger(__name__)

QUANT_SUFFIX = re.compile(r"[.-]((I?Q\d\w*)|F16|F32|BF16)$", re.IGNORECASE)


def base_name(source) -> str:
    """The model's name without a trailing quant label (``SmolLM2-135M-Instruct``)."""
    return QUANT_SUFFIX.sub("", source.name)


def gguf_file_name(source, plan, quant: str) -> str:
    """``<name>-pruned<N>L-<QUANT>.gguf``, or ``<name>-<QUANT>.gguf`` when nothing is removed."""
    if not plan.remove:
        return f"{base_name(source)}-{quant}.gguf"
    return f"{base_name(source)}-pruned{len(plan.keep)}L-{quant}.gguf"


def converter_for(spec, requested: str | None) -> str:
    """Which HF -> GGUF converter writes ``spec``'s family: ``"builtin"`` or ``"llama.cpp"``.

    ``requested`` is ``--converter``: ``auto`` (or None) takes the family's own path (the
    built-in streaming writer where it covers the family, else llama.cpp's script).
    """
    if spec.gguf_converter is None:
        raise ExportError(
            f"GGUF export of {spec.display_name} ({spec.model_type}) is not possible: "
            f"{spec.gguf_note or 'llama.cpp cannot run this family'}",
            hint="export --to hf instead",
        )
    if requested in (None, "auto"):
        return spec.gguf_converter
    if requested == "builtin" and spec.gguf_converter != "builtin":
        raise ExportError(
            f"the built-in GGUF writer does not cover {spec.display_name} ({spec.model_type})",
            hint="use --converter auto or --converter llama.cpp (llama.cpp's own script)",
        )
    return requested


class GGUFConverter:
    name = "gguf"
    # Verification against the torch model: exact types (F32/F16 from safetensors) must
    # agree on top-1 away from near-ties and in KL; quantized files only get the KL bound,
    # since quantization noise on near-tied tokens can flip top-1 freely.
    exact_min_top1 = 0.99
    exact_max_kl = 0.01
    quantized_max_kl = QUANTIZED_MAX_KL

    def check_options(self, options: ExportOptions, source) -> None:
        parse_quant_list(options.quants)
        if source.kind == "pickle":
            raise ExportError(
                "GGUF export reads safetensors; this model has only pickle checkpoints",
                hint="run with --to hf first, then export the hf/ folder it writes",
            )
        requested = options.converter
        if source.kind != "gguf":
            requested = converter_for(source.spec, requested)
        if requested == "llama.cpp":
            from .llama_cpp_converter import convert_script

            convert_script()

    def needs_model(self, source_kind: str, options: ExportOptions) -> bool:
        return bool(options.verify)

    def export(self, ctx: ExportContext) -> list[Artifact]:
        quants = parse_quant_list(ctx.options.quants)
        staging = ctx.out_dir / ".gguf-intermediate"
        staging.mkdir(exist_ok=True)
        base, base_type = self._write_base(ctx, staging, quants)
        if not quants:
            quants = [QUANT_TYPES.get(base_type) or QuantType(base_type, "", exact=False)]
        written: list[tuple[Path, QuantType, str | None]] = []
        healed = healed_tensor_names(ctx.source.spec, ctx.plan)
        precise: dict[Path, list[str]] = {}
        for quant in quants:
            target = ctx.out_dir / gguf_file_name(ctx.source, ctx.plan, quant.name)
            if quant.name == base_type:
                base.replace(target)
                base = target
                written.append((target, quant, None))
                continue
            if base_type not in ("F32", "F16", "BF16"):
                log.warning(
                    "requantizing %s to %s: quality is lower than quantizing from F16",
                    base_type,
                    quant.name,
                )
            with ctx.progress(f"quantizing to {quant.name}", None):
                quantize_gguf(base, target, quant)
                precise[target] = keep_healed_precise(base, target, healed, quant.name)
            written.append((target, quant, base_type if base_type != quant.name else None))
        if base.parent == staging:
            base.unlink()
        staging.rmdir()
        artifacts = [
            self._artifact(ctx, path, quant, requant, precise.get(path))
            for path, quant, requant in written
        ]
        if ctx.options.verify:
            self._verify(ctx, artifacts)
        self._write_modelfile(ctx, [Path(a.path) for a in artifacts])
        self._write_card(ctx, artifacts)
        return artifacts

    def _write_card(self, ctx: ExportContext, artifacts: list[Artifact]) -> None:
        rows = ["| file | quant | size | check against torch |", "|---|---|---:|---|"]
        for art in artifacts:
            check = art.extra.get("verify")
            summary = (
                f"top-1 {check['top1_agreement']:.3f}, KL {check['kl_divergence']:.4f}"
                if check
                else "not verified"
            )
            how = (
                f" (requantized from {art.extra['requantized_from']})"
                if art.extra.get("requantized_from")
                else ""
            )
            if art.extra.get("healed_tensors_q8_0"):
                how += f", healed {', '.join(art.extra['healed_tensors_q8_0'])} at Q8_0"
            rows.append(
                f"| {art.path} | {art.quant}{how} | {art.size_bytes / 1e6:,.1f} MB | {summary} |"
            )
        extra = (
            "## GGUF files\n\n"
            + "\n".join(rows)
            + ("\n\nRun with `llama-cli -m FILE` or `ollama create NAME -f Modelfile`.")
        )
        card = render_model_card(
            original=ctx.source.ref,
            architecture=ctx.source.spec.model_type,
            plan=ctx.plan,
            calibration=ctx.calibration,
            extra=extra,
        )
        (ctx.out_dir / "README.md").write_text(card, encoding="utf-8")

    def _write_base(
        self, ctx: ExportContext, staging: Path, quants: list[QuantType]
    ) -> tuple[Path, str]:
        """The pruned GGUF every quant type starts from, and its type name.

        From safetensors that is F16, or F32 when F32 is among the outputs.
        """
        if ctx.source.kind == "pickle":
            raise ExportError(
                "GGUF export reads safetensors; this model has only pickle checkpoints",
                hint="run with --to hf first, then export the hf/ folder it writes",
            )
        config = ctx.source.config_dict()
        pattern = check_plan(ctx.source.spec, config, ctx.plan)
        if ctx.source.kind == "gguf":
            target = staging / "pruned-source.gguf"
            weights = ctx.plan.patch_weights(ctx.source.spec) or {}
            patches = {
                f"blk.{p}.{ctx.source.spec.gguf_down_proj}.weight": w.float().numpy()
                for p, w in weights.items()
            }
            with ctx.progress("pruning GGUF", None):
                info = prune_gguf(
                    ctx.source.path,
                    ctx.plan,
                    target,
                    patches=patches,
                    progress=ctx.progress,
                    arrays={pattern_key(ctx.source.spec.gguf_arch): pattern} if pattern else None,
                )
            if patches:
                log.info("healed down projections written as F32 into %s", target.name)
            return target, info.file_type or "source"
        check_dense_layers(ctx.source.spec, config, ctx.plan)
        warn_full_attention(ctx.source.spec, config)
        wants_f32 = any(q.name == "F32" for q in quants)
        base_type = "F32" if wants_f32 else "F16"
        target = staging / f"pruned-{base_type}.gguf"
        if converter_for(ctx.source.spec, ctx.options.converter) == "llama.cpp":
            from .llama_cpp_converter import convert_with_llama_cpp

            convert_with_llama_cpp(ctx, target, out_type=base_type)
        else:
            from .hf_to_gguf import convert_pruned

            convert_pruned(ctx, target, out_type=base_type)
        if pattern:
            add_pattern(target, ctx.source.spec.gguf_arch, pattern)
            log.info("wrote the per-layer attention pattern %s into %s", pattern, target.name)
        return target, base_type

    def _artifact(
        self, ctx, path: Path, quant: QuantType, requant: str | None, precise: list | None
    ) -> Artifact:
        extra = {"requantized_from": requant} if requant else {}
        if precise:
            extra["healed_tensors_q8_0"] = precise
        return Artifact.written(path, "gguf", quant.name, ctx.plan, extra)

    def _verify(self, ctx: ExportContext, artifacts: list[Artifact]) -> None:
        from shortgpt_export.fidelity import pruned_reference, verification_windows
        from shortgpt_export.tokenizer_check import source_fingerprint

        from .verify import verify_gguf

        loaded = ctx.loaded
        if loaded is None:
            raise ExportError("GGUF verification needs the torch model", hint="pass --no-verify")
        windows = verification_windows(loaded.tokenizer)
        with ctx.progress("torch reference log-probs", None):
            reference = pruned_reference(loaded, ctx.plan, windows)
        with ctx.progress("the source's tokenizer (truth)", None):
            truth = source_fingerprint(ctx.source)
        for art in artifacts:
            quant = QUANT_TYPES.get(art.quant)
            exact = bool(quant and quant.exact) and ctx.source.kind != "gguf"
            bounds = (
                {"min_top1": self.exact_min_top1, "max_kl": self.exact_max_kl}
                if exact
                else {"min_top1": 0.0, "max_kl": self.quantized_max_kl}
            )
            with ctx.progress(f"verifying {art.path} in llama.cpp", None):
                fidelity = verify_gguf(ctx.out_dir / art.path, reference, truth, windows, **bounds)
            art.extra["verify"] = fidelity.as_dict()

    def _write_modelfile(self, ctx: ExportContext, paths: list[Path]) -> None:
        text = render_modelfile(
            paths[0].name,
            stop_tokens_from_gguf(ctx.out_dir / paths[0]),
            [p.name for p in paths[1:]],
        )
        (ctx.out_dir / "Modelfile").write_text(text, encoding="utf-8")
