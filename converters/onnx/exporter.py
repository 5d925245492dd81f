"""ONNX export: optimum (decoder with KV cache) -> onnxruntime fp16 / int8 / int4, verified."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from shortgpt_export.artifacts import Artifact, path_size
from shortgpt_export.errors import ExportError, ShortGPTError
from shortgpt_export.export_options import ExportOptions
from shortgpt_export.fidelity import QUANTIZED_MAX_KL
from shortgpt_export.model_card import render_model_card

from .. import ExportContext
from .build import check_family, derive, export_fp32
from .precisions import (
    INT8_MODES,
    PRECISIONS,
    Precision,
    check_int4_block,
    parse_precisions,
)

log = logging.getLogger(__name__)

GREEDY_CHECK_TOKENS = 16


class ONNXConverter:
    name = "onnx"
    # Verification against the torch model: fp32 max |log-prob difference| (measured
    # ~1e-5 on tiny models) plus greedy tokens equal with and without the KV cache;
    # fp16/int8/int4 only get the shared KL bound.
    fp32_max_logprob_diff = 1e-3
    quantized_max_kl = QUANTIZED_MAX_KL

    def check_options(self, options: ExportOptions, source) -> None:
        precisions = parse_precisions(options.onnx_precisions)
        if options.int8_mode not in INT8_MODES:
            raise ShortGPTError(
                f"unknown --int8-mode {options.int8_mode!r}",
                hint=f"use {' or '.join(INT8_MODES)}",
            )
        check_family(source.spec)
        if PRECISIONS["int4"] in precisions:
            config = source.config
            sizes = {
                "hidden_size": config.hidden_size,
                "intermediate_size": config.intermediate_size,
            }
            check_int4_block(options.int4_block_size, sizes)

    def needs_model(self, source_kind: str, options: ExportOptions) -> bool:
        # optimum exports the pruned folder, which only a pickle source writes from memory
        return bool(options.verify) or source_kind == "pickle"

    def export(self, ctx: ExportContext) -> list[Artifact]:
        precisions = parse_precisions(ctx.options.onnx_precisions)
        block = ctx.options.int4_block_size
        work = ctx.out_dir / ".onnx-work"
        work.mkdir(exist_ok=True)
        hf_dir = ctx.out_dir / "hf"
        if not (hf_dir / "config.json").is_file():  # no hf export in this run: make one
            hf_dir = work / "hf"
            ctx.write_pruned_hf(hf_dir)
        keep_fp32 = PRECISIONS["fp32"] in precisions
        fp32_dir = ctx.out_dir / "onnx-fp32" if keep_fp32 else work / "onnx-fp32"
        with ctx.progress("exporting ONNX (optimum, with KV cache)", None):
            export_fp32(hf_dir, fp32_dir)
        folders: dict[str, Path] = {"fp32": fp32_dir} if keep_fp32 else {}
        for precision in precisions:
            if precision.name == "fp32":
                continue
            folder = ctx.out_dir / f"onnx-{precision.name}"
            with ctx.progress(f"ONNX {precision.name}: {precision.method}", None):
                derive(
                    fp32_dir,
                    folder,
                    precision,
                    int4_block=block,
                    int8_mode=ctx.options.int8_mode,
                )
            folders[precision.name] = folder
        artifacts = [
            Artifact.written(folder, "onnx", name, ctx.plan) for name, folder in folders.items()
        ]
        if ctx.options.verify:
            self._verify(ctx, artifacts, fp32_dir, block)
        for art in artifacts:
            self._write_card(ctx, art, block)
            art.size_bytes = path_size(ctx.out_dir / art.path)
        shutil.rmtree(work)
        return artifacts

    def _verify(
        self, ctx: ExportContext, artifacts: list[Artifact], fp32_dir: Path, block: int
    ) -> None:
        from shortgpt_export.fidelity import (
            compare_logprobs,
            pruned_reference,
            verification_windows,
        )
        from shortgpt_export.onnx_runtime import OnnxDecoder
        from shortgpt_export.tokenizer_check import check_artifact, source_fingerprint

        if ctx.loaded is None:
            raise ExportError("ONNX verification needs the torch model", hint="pass --no-verify")
        windows = verification_windows(ctx.loaded.tokenizer)
        with ctx.progress("torch reference log-probs", None):
            reference = pruned_reference(ctx.loaded, ctx.plan, windows)
        truth = source_fingerprint(ctx.source)
        for art in artifacts:
            precision: Precision = PRECISIONS[art.quant]
            check_artifact(truth, ctx.out_dir / art.path)  # tokenizer, chat, end of turn
            with ctx.progress(f"verifying {art.path} in onnxruntime", None):
                decoder = OnnxDecoder(ctx.out_dir / art.path)
                fidelity = compare_logprobs(reference, decoder.logprobs(windows))
            art.extra["verify"] = fidelity.as_dict()
            if precision.exact:
                prompt = windows[0, :16].tolist()
                cached = decoder.greedy(prompt, GREEDY_CHECK_TOKENS, use_cache=True)
                full = decoder.greedy(prompt, GREEDY_CHECK_TOKENS, use_cache=False)
                art.extra["verify"]["greedy_cache_equal"] = cached == full
                # written so that NaN fails too
                if (
                    not fidelity.max_abs_logprob_diff <= self.fp32_max_logprob_diff
                    or cached != full
                ):
                    raise ExportError(
                        f"{art.path} disagrees with the torch model: max |log-prob diff| "
                        f"{fidelity.max_abs_logprob_diff:.2e} "
                        f"(need <= {self.fp32_max_logprob_diff}), "
                        f"greedy tokens with and without KV cache equal: {cached == full}",
                        hint="report this as a bug; pass --no-verify to keep the files anyway",
                    )
            elif not fidelity.kl_divergence <= self.quantized_max_kl:  # NaN fails too
                raise ExportError(
                    f"{art.path} disagrees with the torch model: mean KL "
                    f"{fidelity.kl_divergence:.3f} (need <= {self.quantized_max_kl}), top-1 "
                    f"agreement {fidelity.top1_agreement:.3f}",
                    hint="report this as a bug; pass --no-verify to keep the files anyway",
                )

    def _write_card(self, ctx: ExportContext, art: Artifact, block: int) -> None:
        precision = PRECISIONS[art.quant]
        how = {
            "int4": f"4-bit weight-only MatMulNBits, symmetric, block size {block}",
            "int8": "8-bit weight-only MatMulNBits, block size 32"
            if ctx.options.int8_mode == "weight-only"
            else "onnxruntime dynamic quantization of the MatMuls (QInt8 weights, "
            "activations quantized per tensor at run time)",
        }.get(precision.name, precision.method)
        check = art.extra.get("verify")
        lines = [
            f"## ONNX ({precision.name})",
            "",
            f"Precision: {how}.",
            f"Model files: {art.size_bytes / 1e6:,.1f} MB.",
        ]
        if check:
            lines.append(
                f"Against the pruned torch model: mean KL {check['kl_divergence']:.2e}, "
                f"top-1 agreement {check['top1_agreement']:.3f}, max |log-prob diff| "
                f"{check['max_abs_logprob_diff']:.2e} over {check['tokens']} tokens."
            )
        lines += [
            "",
            "Load with `optimum.onnxruntime.ORTModelForCausalLM.from_pretrained(folder)` "
            "or a plain `onnxruntime.InferenceSession(folder + '/model.onnx')`.",
        ]
        card = render_model_card(
            original=ctx.source.ref,
            architecture=ctx.source.spec.model_type,
            plan=ctx.plan,
            calibration=ctx.calibration,
            extra="\n".join(lines),
        )
        (ctx.out_dir / art.path / "README.md").write_text(card, encoding="utf-8")
