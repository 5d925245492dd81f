"""``shortgpt-export plan SCORES``: choose layers from a scores.json without the model."""

from __future__ import annotations

import argparse

from .. import pipeline
from . import common, display


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shortgpt-export plan",
        description="Write plan.json from a scores.json (from `shortgpt-export score`), for "
        "`shortgpt-export prune MODEL --plan plan.json`. Only selections that need no model "
        "run here: by score, or as a block (greedy selection and healing need the model: "
        "use the main command for them).",
    )
    parser.add_argument("scores", help="scores.json written by `shortgpt-export score`")
    group = parser.add_argument_group("which layers to remove (default: 25% lowest-scored)")
    exclusive = group.add_mutually_exclusive_group()
    exclusive.add_argument("--remove", type=int, metavar="N", help="remove N layers")
    exclusive.add_argument("--ratio", type=float, metavar="R", help="remove this fraction")
    exclusive.add_argument(
        "--layers", type=common.layer_list, metavar="I,J,...", help="remove exactly these"
    )
    group.add_argument(
        "--select",
        choices=pipeline.PLAN_ONLY_STRATEGIES,
        default="score",
        help="score: the N lowest scores (default); block: the N contiguous layers with the "
        "closest input and output (needs scores.json from `score`, which records them)",
    )
    out = parser.add_argument_group("output")
    out.add_argument(
        "--out", default=None, help="folder for plan.json (default: the scores.json folder)"
    )
    out.add_argument("--force", action="store_true", help="replace an existing plan.json")
    out.add_argument("--json", action="store_true", help="print a machine-readable summary")
    out.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    return parser


def execute(args) -> int:
    plan, path = pipeline.plan_from_scores(
        args.scores,
        remove=args.remove,
        ratio=args.ratio,
        layers=args.layers,
        select=args.select,
        out=args.out,
        force=args.force,
    )
    if args.json:
        common.print_json({"path": str(path), "remove": plan.remove, "keep": plan.keep})
        return 0
    common.stdout.print(display.plan_line(plan))
    common.stdout.print(f"wrote {path}")
    return 0
