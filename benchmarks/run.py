"""`make bench`: run every benchmark and write benchmarks/RESULTS.md."""

from __future__ import annotations

import datetime
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_gguf  # noqa: E402
import bench_scoring  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def main() -> None:
    header = (
        "# Benchmark results\n\n"
        f"Measured by `make bench` on {datetime.date.today().isoformat()}: "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"Python {platform.python_version()}, torch {torch.__version__}. "
        "All ratios are measured side by side in one run; times are medians.\n\n"
    )
    sections = [bench_scoring.report(), bench_gguf.report()]
    RESULTS.write_text(header + "\n".join(sections), encoding="utf-8")
    print(RESULTS.read_text())


if __name__ == "__main__":
    main()
