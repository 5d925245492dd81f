"""``shortgpt-export [MODEL]`` (the main command): load, score, plan, prune and export."""

from __future__ import annotations

import argparse

from .. import pipeline
from . import SUBCOMMANDS, common, display


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shortgpt-export",
        description="Score every layer (ShortGPT Block Influence), remove the least influential "
        "ones and export the shallower model. Subcommands: "
        + ", ".join(name for name in SUBCOMMANDS if name != "run")
        + " (see `shortgpt-export SUBCOMMAND -h`).",
    )
    common.add_model_args(parser)
    common.add_score_args(parser)
    common.add_plan_args(parser)
    common.add_output_args(parser)
    common.add_export_args(parser)
    parser.add_argument(
        "--validate",
        action="store_true",
        help="also export the unpruned model at the same types into baseline/ "
        "and measure everything (report.json, report.md, plots)",
    )
    common.add_eval_args(parser)
    parser.add_argument("--dry-run", action="store_true", help="score and write plan.json only")
    return parser


# Flags that only mean something with --validate: refused without it, never ignored.
VALIDATION_ONLY = ("eval", "ctx", "max_tokens", "kl_windows", "latency_runs", "devices", "qa")


def check_combinations(parser: argparse.ArgumentParser, args) -> None:
    """Refuse flags that would be silently ignored in this combination."""
    given = [d for d in VALIDATION_ONLY if getattr(args, d) != parser.get_default(d)]
    if given and not args.validate:
        flags = ", ".join("--" + d.replace("_", "-") for d in given)
        parser.error(f"without --validate, {flags} would be ignored; add --validate or drop it")
    if args.validate and args.dry_run:
        parser.error("--validate has nothing to measure with --dry-run; drop one of them")
    greedy_only = [
        d
        for d in ("select_tokens", "greedy_candidates")
        if getattr(args, d) != parser.get_default(d)
    ]
    if greedy_only and args.select != "greedy":
        flags = ", ".join("--" + d.replace("_", "-") for d in greedy_only)
        parser.error(f"{flags} only apply to --select greedy; add it or drop them")
    auto = "auto" in (args.remove, args.ratio)
    if args.max_ppl_increase is not None and not (args.validate or auto):
        parser.error(
            "--max-ppl-increase needs --validate (a gate on the exported files) or "
            "--remove auto / --ratio auto (a budget for the layer count)"
        )


def execute(args) -> int:
    result = pipeline.run(
        common.model_options(args),
        common.score_options(args),
        common.plan_options(args),
        out=args.out,
        export=common.export_options(args),
        validate=common.eval_options(args) if args.validate else None,
        max_ppl_increase=args.max_ppl_increase,
        dry_run=args.dry_run,
        force=args.force,
        progress=common.rich_progress,
    )
    if args.json:
        common.print_json(result.summary())
        return 0
    common.stdout.print(display.scores_table(result.scores, result.plan))
    common.stdout.print(display.plan_line(result.plan))
    if result.artifacts:
        common.stdout.print(display.artifacts_table(result.artifacts, result.out))
    if result.report:
        for item in display.report_renderables(result.report):
            common.stdout.print(item)
    if args.dry_run:
        common.stdout.print(f"dry run: wrote {result.out / 'plan.json'}")
    return 0
