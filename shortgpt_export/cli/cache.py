"""``shortgpt-export cache info|clear``: the converted copies of GGUF sources."""

from __future__ import annotations

import argparse
import time

from .. import load_cache
from . import common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shortgpt-export cache",
        description="GGUF sources are dequantized and their tokenizer rebuilt once, then "
        f"loaded from a converted copy in {load_cache.cache_root()} (capped by "
        "SHORTGPT_EXPORT_CACHE_SIZE, default 8G; 0 turns it off). The default model's "
        "GGUF itself is not touched.",
    )
    parser.add_argument("action", choices=("info", "clear"), help="list the entries or delete them")
    parser.add_argument("--json", action="store_true", help="print a machine-readable summary")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def _size(n: int) -> str:
    return f"{n / 1024**2:,.1f} MiB"


def execute(args) -> int:
    if args.action == "clear":
        count, freed = load_cache.clear()
        if args.json:
            common.print_json({"removed": count, "freed_bytes": freed})
        else:
            common.stdout.print(f"removed {count} cache entries ({_size(freed)})")
        return 0
    entries = load_cache.list_entries()
    total, limit = sum(e.size for e in entries), load_cache.size_limit()
    if args.json:
        common.print_json(
            {
                "folder": str(load_cache.cache_root()),
                "limit_bytes": limit,
                "total_bytes": total,
                "entries": [vars(e) for e in entries],
            }
        )
        return 0
    common.stdout.print(
        f"{load_cache.cache_root()}: {len(entries)} entries, {_size(total)} of {_size(limit)}",
        highlight=False,
    )
    for e in entries:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
        common.stdout.print(
            f"  {e.name}  {e.dtype:<8} {_size(e.size):>12}  used {used}  {e.source}",
            highlight=False,
            soft_wrap=True,
        )
    return 0
