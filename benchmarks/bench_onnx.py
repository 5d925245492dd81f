"""onnxruntime speed and size: pruned vs. unpruned, fp32 vs. int8 vs. int4 (default model).

One run exports the default model with 25% of layers removed to ONNX fp32, int8 and int4,
and the unpruned model at the same precisions (``--validate``'s baseline), then measures
every folder in its own worker process with the same prompt: prompt tok/s, generation
tok/s (greedy, KV cache), time to first token, file size.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from shortgpt_export.export_options import ExportOptions
from shortgpt_export.pipeline import ModelOptions, PlanOptions, ScoreOptions, run
from shortgpt_export.validation import EvalOptions

WORK = Path(__file__).resolve().parent / "_work"


def report() -> str:
    out = WORK / "onnx"
    shutil.rmtree(out, ignore_errors=True)
    result = run(
        ModelOptions(),
        ScoreOptions(),
        PlanOptions(ratio=0.25),
        out=out,
        export=ExportOptions(onnx_precisions=["fp32", "int8", "int4"], verify=False),
        validate=EvalOptions(max_tokens=1024, ctx=512, kl_windows=1, threads=2, reps=5),
    )
    arts = {(a["pruned"], a["quant"]): a for a in result.report["artifacts"]}
    lines = [
        "## ONNX (onnxruntime) speed and size",
        "",
        f"Default model, {len(result.plan.remove)} of 30 layers removed "
        f"({'healed' if result.plan.heal else 'not healed'}, the defaults: calibration on "
        "the built-in calibration text); onnxruntime CPU, 2 threads; prompt 128 tokens, 32 "
        "generated greedily with the KV cache; median of 5 after a warm-up. Perplexity on "
        "the first 1,024 tokens of the built-in evaluation text, for orientation.",
        "",
        "| precision | layers | size MB | prompt tok/s | gen tok/s | gen speed-up | perplexity |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for quant in ("fp32", "int8", "int4"):
        base = arts[(False, quant)]
        for pruned in (False, True):
            a = arts[(pruned, quant)]
            lines.append(
                f"| {quant} | {a['layers']} | {a['size_bytes'] / 1e6:,.0f} | "
                f"{a['prompt_tok_s']:,.0f} | {a['gen_tok_s']:,.1f} | "
                f"{a['gen_tok_s'] / base['gen_tok_s']:.2f}x | {a['perplexity']:,.1f} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(report())
