"""The stacking table on the default model: {original, pruned} x {F16, Q8_0, Q4_K_M}.

25% of layers removed (7 of 30), WikiText-2 test split, 512-token windows, with the
time each step took (recorded through the library's progress hook). Calibration (scoring
and healing) reads the split's last quarter, evaluation its first three quarters: never
the same text.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from shortgpt_export.export_options import ExportOptions
from shortgpt_export.pipeline import ModelOptions, PlanOptions, ScoreOptions, run
from shortgpt_export.report import TABLE_HEADER, markdown_table, quant_factors, table_rows
from shortgpt_export.validation import EvalOptions

WORK = Path(__file__).resolve().parent / "_work"
WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw-test.txt"
CALIB_SHARE = 0.25  # the tail of the split calibrates; the rest is evaluated


def split_text(source: Path, folder: Path) -> tuple[Path, Path]:
    """``source`` cut at a line boundary into an evaluation head and a calibration tail
    (the last ``CALIB_SHARE`` of its characters), written into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = source.read_text("utf-8").splitlines(keepends=True)
    limit = (1 - CALIB_SHARE) * sum(map(len, lines))
    total, cut = 0, len(lines)
    for index, line in enumerate(lines):
        total += len(line)
        if total >= limit:
            cut = index + 1
            break
    head, tail = folder / "wikitext-test-head.txt", folder / "wikitext-test-tail.txt"
    head.write_text("".join(lines[:cut]), "utf-8")
    tail.write_text("".join(lines[cut:]), "utf-8")
    return head, tail


class StepTimer:
    """A progress factory that records how long each step took."""

    def __init__(self):
        self.steps: list[tuple[str, float]] = []

    @contextmanager
    def __call__(self, description, total=None):
        began = time.perf_counter()
        yield lambda n=1: None
        self.steps.append((description, time.perf_counter() - began))


VALIDATION_STEPS = (
    "reference log-probabilities",
    "original (torch)",
    "pruned (torch)",
    "validating",
)


def count_tokens(gguf: Path, text_file: Path) -> int:
    """Tokens in ``text_file`` as validation joins it, counted by the GGUF's tokenizer
    (checked identical to the reference tokenizer during validation)."""
    import llama_cpp

    from shortgpt_export.calibration import read_evaluation_text

    texts, _ = read_evaluation_text(str(text_file))
    vocab = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    try:
        return len(vocab.tokenize("\n\n".join(texts).encode("utf-8"), add_bos=False))
    finally:
        vocab.close()


def report(max_tokens: int | None = None) -> str:
    """The stacking table; ``max_tokens`` (or $BENCH_EVAL_TOKENS) caps the evaluation text,
    which is otherwise the whole WikiText-2 test split."""
    max_tokens = max_tokens or int(os.environ.get("BENCH_EVAL_TOKENS", "0")) or None
    out = WORK / "stacking"
    shutil.rmtree(out, ignore_errors=True)
    head, tail = split_text(WIKITEXT, WORK)
    timer = StepTimer()
    eval_opts = EvalOptions(
        eval=str(head), ctx=512, max_tokens=max_tokens or 10**9, kl_windows=2, threads=2
    )
    began = time.perf_counter()
    result = run(
        ModelOptions(),
        ScoreOptions(calib=str(tail)),
        PlanOptions(ratio=0.25),
        out=out,
        export=ExportOptions(formats=["gguf"], quants=["F16", "Q8_0", "Q4_K_M"]),
        validate=eval_opts,
        progress=timer,
    )
    total = time.perf_counter() - began
    rep = result.report
    split_tokens = count_tokens(next((out / "baseline").glob("*-F16.gguf")), head)
    evaluated = rep["eval"]["tokens"]
    validation_s = sum(s for name, s in timer.steps if name.startswith(VALIDATION_STEPS))
    coverage = (
        "all of it"
        if evaluated + rep["eval"]["ctx"] > split_tokens
        else f"the first {evaluated:,} of its {split_tokens:,} tokens "
        f"({evaluated / split_tokens:.0%}; `BENCH_EVAL_TOKENS` caps it). At this run's rate the "
        f"eight evaluations of all of it would take about "
        f"{validation_s * split_tokens / evaluated / 60:,.0f} min instead of "
        f"{validation_s / 60:,.0f} (an extrapolation, not a measurement)"
    )
    heal = result.plan.heal
    healing = f"healed ({heal['method']}, the defaults)" if heal else "not healed"
    lines = [
        "## Stacking table: pruning and quantization (default model)",
        "",
        f"SmolLM2-135M-Instruct, {len(result.plan.remove)} of 30 layers removed by BI "
        f"({result.plan.remove}), {healing}. Calibration (scoring and healing) on the last "
        f"quarter of WikiText-2 test ({result.scores.calibration['tokens']:,} tokens), "
        f"evaluation on its first three quarters ({evaluated:,} tokens in windows of "
        f"{rep['eval']['ctx']}; KL and top-1 over the first {rep['eval']['kl_tokens']} "
        f"tokens): never the same text. CPU, 2 threads. Evaluated on {coverage}.",
        "",
        *markdown_table(TABLE_HEADER, table_rows(rep["artifacts"])),
        "",
        *quant_factors(rep["artifacts"]),
        "",
        "Time per step (s):",
        "",
        "| step | seconds |",
        "|---|---:|",
        *(f"| {name} | {seconds:,.1f} |" for name, seconds in timer.steps),
        f"| **total** | {total:,.1f} |",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-tokens", type=int, default=None)
    print(report(parser.parse_args().max_tokens))
