"""``shortgpt-export score [MODEL]``: write scores.json and show the layer table."""

from __future__ import annotations

import argparse

from .. import pipeline
from . import common, display


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shortgpt-export score", description="Compute the score of every decoder layer."
    )
    common.add_model_args(parser)
    common.add_score_args(parser)
    common.add_output_args(parser)
    return parser


def execute(args) -> int:
    scores, path = pipeline.score(
        common.model_options(args),
        common.score_options(args),
        out=args.out,
        force=args.force,
        progress=common.rich_progress,
    )
    if args.json:
        common.print_json({**scores.__dict__, "path": str(path)})
        return 0
    common.stdout.print(display.scores_table(scores))
    common.stdout.print(f"wrote {path}")
    return 0
