"""`make bench`: run the benchmarks and assemble benchmarks/RESULTS.md.

    python benchmarks/run.py                 # every section
    python benchmarks/run.py gguf            # one section; the others keep their last figures
    python benchmarks/run.py io              # load cache, --help cost, export MB/s (make bench-io)
    python benchmarks/run.py recipes         # selection x healing (make bench-recipes)
    python benchmarks/run.py offload         # layer-by-layer scoring of a 4 GB random model
    python benchmarks/run.py --assemble      # only rebuild RESULTS.md from results/*.md

Each section is written to benchmarks/results/<name>.md as soon as it finishes.
"""

from __future__ import annotations

import datetime
import platform
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_gguf  # noqa: E402
import bench_io  # noqa: E402
import bench_offload  # noqa: E402
import bench_onnx  # noqa: E402
import bench_recipes  # noqa: E402
import bench_scoring  # noqa: E402
import bench_validation  # noqa: E402

SECTIONS = {
    "scoring": bench_scoring.report,
    "gguf": bench_gguf.report,
    "io": bench_io.report,
    "onnx": bench_onnx.report,
    "validation": bench_validation.report,
    "recipes": bench_recipes.report,
    "offload": bench_offload.report,
}
RESULTS = HERE / "RESULTS.md"
PARTS = HERE / "results"


def main(names: list[str]) -> None:
    """Run the named sections (all by default; ``--assemble`` runs none) and write RESULTS.md."""
    PARTS.mkdir(exist_ok=True)
    if names == ["--assemble"]:
        names = []
    elif not names:
        names = list(SECTIONS)
    for name in names:
        stamp = (
            f"_Measured on {datetime.date.today().isoformat()}: "
            f"{platform.machine()}, {torch.get_num_threads()} threads, Python "
            f"{platform.python_version()}, torch {torch.__version__}._\n\n"
        )
        (PARTS / f"{name}.md").write_text(SECTIONS[name]() + "\n" + stamp, encoding="utf-8")
    header = (
        "# Benchmark results\n\nWritten by `make bench`. Ratios are measured side by side "
        "in one run; times are medians. Each section says when and where it was measured.\n\n"
    )
    body = [(PARTS / f"{n}.md").read_text() for n in SECTIONS if (PARTS / f"{n}.md").is_file()]
    # sections measured by hand (results/<name>.md without a bench script) follow
    body += [p.read_text() for p in sorted(PARTS.glob("*.md")) if p.stem not in SECTIONS]
    RESULTS.write_text(header + "\n".join(body), encoding="utf-8")
    print(RESULTS.read_text())


if __name__ == "__main__":
    main(sys.argv[1:])
