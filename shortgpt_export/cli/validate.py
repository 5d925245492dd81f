"""``shortgpt-export validate ARTIFACT... --reference MODEL --out DIR``."""

from __future__ import annotations

import argparse

from .. import pipeline
from . import common, display


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shortgpt-export validate",
        description="Perplexity, agreement with the original model, size and latency of GGUF "
        "files, ONNX folders and Hugging Face folders.",
    )
    parser.add_argument("artifacts", nargs="+", metavar="ARTIFACT")
    parser.add_argument(
        "--reference",
        default=None,
        metavar="MODEL",
        help="the original model (default: the built-in default model)",
    )
    parser.add_argument("--out", required=True, help="folder for report.json, report.md, plots")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--json", action="store_true", help="print report.json to stdout")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    common.add_offload_argument(
        parser,
        "layers: compute the reference's log-probabilities and torch row one decoder layer "
        "in memory at a time (no torch latency or QA), for references larger than memory; "
        "auto (default): only when the reference does not fit the free memory",
    )
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--allow-pickle", action="store_true")
    common.add_eval_args(parser)
    return parser


def execute(args) -> int:
    args.model = args.reference
    report = pipeline.validate(
        common.model_options(args),
        args.artifacts,
        common.eval_options(args),
        out=args.out,
        force=args.force,
        max_ppl_increase=args.max_ppl_increase,
        offload=args.offload,
        progress=common.rich_progress,
    )
    if args.json:
        common.print_json(report)
    else:
        for item in display.report_renderables(report):
            common.stdout.print(item)
        common.stdout.print(f"wrote {args.out}/report.json, report.md and plots")
    return 0
