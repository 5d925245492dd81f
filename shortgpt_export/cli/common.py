"""What every subcommand shares: option groups, progress bars, error reporting."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from ..errors import ShortGPTError
from ..export_options import ExportOptions
from ..pipeline import ModelOptions, PlanOptions, ScoreOptions
from ..planning import parse_layer_list

stdout = Console()
stderr = Console(stderr=True)


def layer_list(text: str) -> list[int]:
    """argparse type for ``--layers``: a bad list is a usage error, not a traceback."""
    try:
        return parse_layer_list(text)
    except ShortGPTError as exc:
        raise argparse.ArgumentTypeError(exc.message) from exc


def positive_int(text: str) -> int:
    """argparse type for counts and sizes that must be at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


@contextmanager
def rich_progress(description: str, total: int | None = None) -> Iterator:
    """A progress bar (or a spinner when the total is unknown) on stderr."""
    columns = [SpinnerColumn(), TextColumn("{task.description}")]
    if total is not None:
        columns += [BarColumn(), MofNCompleteColumn()]
    columns.append(TimeElapsedColumn())
    with Progress(*columns, console=stderr, transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)
        if total is None:
            bar.update(task, total=1, completed=1)


def add_model_args(parser: argparse.ArgumentParser, optional_model: bool = True) -> None:
    parser.add_argument(
        "model",
        nargs="?" if optional_model else None,
        default=None,
        metavar="MODEL",
        help="Hugging Face folder, hub id or .gguf file "
        "(default: the built-in SmolLM2-135M-Instruct)",
    )
    group = parser.add_argument_group("loading")
    group.add_argument(
        "--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, mps"
    )
    group.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16")
    group.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow model code from the model folder or hub (off by default)",
    )
    group.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow .bin/.pt pickle checkpoints, which can run code when loaded",
    )


def add_score_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("calibration and scoring")
    group.add_argument(
        "--calib",
        default=None,
        help="a .txt or .jsonl file, or wikitext2, pg19, c4 (needs network); "
        "default: the built-in offline mixed-domain text",
    )
    group.add_argument(
        "--calib-tokens", type=int, default=8192, help="tokens to score on (default 8192)"
    )
    group.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
    group.add_argument(
        "--batch-size",
        type=int,
        default=4,
        help="windows per forward pass (default 4; layer-by-layer scoring runs at most 2)",
    )
    group.add_argument("--seed", type=int, default=0, help="seed for window sampling (default 0)")
    group.add_argument(
        "--metric",
        choices=("bi", "angular"),
        default="bi",
        help="bi: 1 - mean cosine (ShortGPT); angular: arccos(cos)/pi (Gromov et al.)",
    )
    add_offload_argument(
        group,
        "layers: one decoder layer in memory at a time, for models larger than memory "
        "(scoring; on the main command also every --select, --remove auto, healing, "
        "verification and --validate); auto (default): only when the model does not fit "
        "the device's free memory",
    )


def add_offload_argument(parser, help_text: str) -> None:
    """``--offload auto|none|layers`` (pipeline.ScoreOptions.offload)."""
    parser.add_argument(
        "--offload", choices=("auto", "none", "layers"), default="auto", help=help_text
    )


def _count_or_auto(kind):
    def parse(text: str):
        if text.strip().lower() == "auto":
            return "auto"
        try:
            return kind(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number or 'auto'") from exc

    return parse


def add_plan_args(parser: argparse.ArgumentParser) -> None:
    from ..healing import DEFAULT_HEAL, HEAL_METHODS
    from ..recipe import DEFAULT_SELECT_TOKENS
    from ..selection import STRATEGIES

    group = parser.add_argument_group("which layers to remove (default: 25% lowest-scored)")
    exclusive = group.add_mutually_exclusive_group()
    exclusive.add_argument(
        "--remove",
        type=_count_or_auto(int),
        metavar="N|auto",
        help="remove N layers; auto: the most whose held-out perplexity stays within "
        "--max-ppl-increase times the original's",
    )
    exclusive.add_argument(
        "--ratio",
        type=_count_or_auto(float),
        metavar="R|auto",
        help="remove this fraction of the layers (auto: as --remove auto)",
    )
    group.add_argument(
        "--select",
        choices=STRATEGIES,
        default="score",
        help="score: the N lowest by --metric (ShortGPT, default); greedy: one at a time by "
        "calibration loss (SLEB); block: the N contiguous layers with the closest input "
        "and output (Gromov et al.)",
    )
    group.add_argument(
        "--heal",
        choices=HEAL_METHODS,
        default=DEFAULT_HEAL,
        help="linear: merge a least-squares patch per removed run into the previous "
        "layer's MLP down projection (kept only if it lowers held-out loss); refit: that, "
        "then refit the down projection of every kept layer after the first cut; none: "
        "plain removal; auto: linear where the family allows it, else none with a warning "
        f"(default {DEFAULT_HEAL})",
    )
    group.add_argument(
        "--select-tokens",
        type=int,
        default=DEFAULT_SELECT_TOKENS,
        metavar="N",
        help=f"calibration tokens greedy selection uses (default {DEFAULT_SELECT_TOKENS})",
    )
    group.add_argument(
        "--greedy-candidates",
        type=positive_int,
        default=None,
        metavar="K",
        help="greedy tries only the K lowest-scored kept layers at each step (default: all)",
    )
    exclusive.add_argument(
        "--layers",
        type=layer_list,
        metavar="I,J,...",
        help="remove exactly these layers (0-based)",
    )


def add_output_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--out", default=None, help="output folder (default: <model>-shortgpt)")
    group.add_argument("--force", action="store_true", help="replace --out if it exists")
    group.add_argument("--json", action="store_true", help="print a machine-readable summary")
    group.add_argument("-v", "--verbose", action="store_true", help="log more detail")


def add_export_args(parser: argparse.ArgumentParser) -> None:
    from shortgpt_export.converters import supported_formats
    from shortgpt_export.converters.gguf.quantize import QUANT_TYPES

    group = parser.add_argument_group("export")
    group.add_argument(
        "--to",
        default=None,
        help=f"comma-separated formats: {', '.join(supported_formats())} (default hf; "
        "a GGUF quant flag alone implies gguf)",
    )
    group.add_argument(
        "--quant",
        action="append",
        default=[],
        metavar="TYPE[,TYPE...]",
        help="GGUF quant types, case-insensitive (default: the source GGUF's own type, or F16)",
    )
    for quant in QUANT_TYPES.values():
        if not quant.needs_imatrix:
            group.add_argument(
                f"--{quant.name.lower()}",
                dest="quant",
                action="append_const",
                const=quant.name,
                help=argparse.SUPPRESS,
            )
    for name in ("fp32", "fp16", "int8", "int4"):
        group.add_argument(
            f"--{name}",
            dest="onnx",
            action="append_const",
            const=name,
            help=f"write onnx-{name}/ (implies --to onnx)",
        )
    group.add_argument(
        "--int4-block-size",
        type=positive_int,
        default=32,
        metavar="N",
        help="block size of --int4 weight-only quantization (default 32)",
    )
    group.add_argument(
        "--int8-mode",
        choices=("dynamic", "weight-only"),
        default="dynamic",
        help="--int8 as onnxruntime dynamic quantization (default) or 8-bit "
        "weight-only MatMulNBits (far more accurate on small models)",
    )
    group.add_argument(
        "--no-verify",
        action="store_true",
        help="skip checking each written artifact: GGUF/ONNX outputs against the torch "
        "model, and every artifact's tokenizer, special tokens and chat template against "
        "the source's",
    )
    group.add_argument(
        "--converter",
        choices=("auto", "builtin", "llama.cpp"),
        default="auto",
        help="HF->GGUF converter; auto: the built-in streaming writer for the families it "
        "covers (Llama, Mistral, Qwen2, Qwen3), else llama.cpp's convert_hf_to_gguf.py "
        "(from $LLAMA_CPP_DIR or the cache)",
    )


def export_options(args) -> ExportOptions:
    """The export flags as one typed object (flag names equal field names)."""
    return ExportOptions(
        formats=args.to or [],
        quants=[q for item in args.quant for q in item.split(",") if q.strip()],
        onnx_precisions=args.onnx or [],
        int4_block_size=args.int4_block_size,
        int8_mode=args.int8_mode,
        converter=args.converter,
        verify=not args.no_verify,
    )


def add_eval_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("validation")
    group.add_argument(
        "--eval",
        default=None,
        metavar="FILE|NAME",
        help="evaluation text: a .txt/.jsonl file or wikitext2, pg19, c4 (their held-out "
        "split, never the part --calib reads; default: the built-in evaluation text, "
        "disjoint from the calibration text)",
    )
    group.add_argument(
        "--ctx", type=positive_int, default=512, help="tokens per window (default 512)"
    )
    group.add_argument(
        "--max-tokens",
        type=positive_int,
        default=4096,
        help="evaluation tokens at most (default 4096)",
    )
    group.add_argument(
        "--kl-windows",
        type=positive_int,
        default=2,
        help="windows whose full distributions are compared (default 2)",
    )
    group.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="CPU threads for every back-end (default: all cores)",
    )
    group.add_argument(
        "--latency-runs",
        type=positive_int,
        default=3,
        metavar="N",
        help="timed latency runs per artifact after one warm-up; the median is reported "
        "(default 3)",
    )
    group.add_argument(
        "--devices",
        choices=("auto", "cpu"),
        default="auto",
        help="auto: CPU figures plus KL, top-1 and speed on every accelerator found "
        "(llama.cpp Metal/CUDA, onnxruntime CoreML/CUDA, torch CUDA/MPS); cpu: CPU only "
        "(default: auto)",
    )

    def question_count(text: str) -> int | None:
        return None if text == "all" else int(text)

    group.add_argument(
        "--qa",
        type=question_count,
        default=20,
        metavar="N|all",
        help="ask each artifact the first N built-in questions in chat and report exact-match "
        "accuracy (0 skips it; all: every question; default 20)",
    )
    group.add_argument(
        "--max-ppl-increase",
        type=float,
        default=None,
        metavar="X",
        help="with --validate: fail (exit 3) when a pruned artifact's perplexity exceeds X "
        "times the original's; with --remove auto: the budget, the most layers whose "
        "held-out perplexity stays within X times the original's",
    )


def eval_options(args):
    from ..validation import EvalOptions

    opts = EvalOptions(
        eval=args.eval,
        ctx=args.ctx,
        max_tokens=args.max_tokens,
        kl_windows=args.kl_windows,
        reps=args.latency_runs,
        devices=args.devices,
        qa=args.qa,
    )
    if args.threads:
        opts.threads = args.threads
    return opts


def model_options(args) -> ModelOptions:
    return ModelOptions(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
        allow_pickle=args.allow_pickle,
    )


def score_options(args) -> ScoreOptions:
    return ScoreOptions(
        calib=args.calib,
        calib_tokens=args.calib_tokens,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        seed=args.seed,
        metric=args.metric,
        offload=args.offload,
    )


def plan_options(args) -> PlanOptions:
    auto = "auto" in (args.remove, args.ratio)
    return PlanOptions(
        remove=None if auto else args.remove,
        ratio=None if auto else args.ratio,
        layers=args.layers,
        select=args.select,
        heal=args.heal,
        auto=auto,
        select_tokens=args.select_tokens,
        greedy_candidates=args.greedy_candidates,
    )


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=stderr, show_path=False)],
        force=True,
    )
    # --verbose is about our steps; torch's INFO lines (e.g. its cache statistics, logged
    # at exit) are not
    for noisy in ("torch", "accelerate", "llama-cpp-python"):
        logging.getLogger(noisy).setLevel(logging.WARNING if verbose else logging.ERROR)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # our own bars replace its tqdm bars


def print_json(data: dict) -> None:
    print(json.dumps(data, indent=2, default=str))
