"""``shortgpt-export prune [MODEL] --plan plan.json``: apply a plan and export."""

from __future__ import annotations

import argparse

from .. import pipeline
from . import common, display


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shortgpt-export prune", description="Remove the layers a plan.json names and export."
    )
    common.add_model_args(parser)
    parser.add_argument("--plan", required=True, help="plan.json from a run or a --dry-run")
    common.add_export_args(parser)
    common.add_output_args(parser)
    return parser


def execute(args) -> int:
    result = pipeline.prune(
        common.model_options(args),
        args.plan,
        out=args.out,
        export=common.export_options(args),
        force=args.force,
        progress=common.rich_progress,
    )
    if args.json:
        common.print_json(result.summary())
        return 0
    common.stdout.print(display.plan_line(result.plan))
    common.stdout.print(display.artifacts_table(result.artifacts, result.out))
    return 0
