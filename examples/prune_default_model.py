"""Score the default model on your own text and write a pruned Hugging Face folder.

python examples/prune_default_model.py notes.txt out-dir
"""

import sys

from shortgpt_export.export_options import ExportOptions
from shortgpt_export.pipeline import ModelOptions, PlanOptions, ScoreOptions, run

calib = sys.argv[1] if len(sys.argv) > 1 else None
out = sys.argv[2] if len(sys.argv) > 2 else "example-out"
result = run(
    ModelOptions(),
    ScoreOptions(calib=calib),
    PlanOptions(remove=4),
    out=out,
    export=ExportOptions(formats=["hf"]),
    force=True,
)
for layer in result.plan.remove:
    print(f"removed layer {layer:2d}  BI {result.scores.scores[layer]:.4f}")
print(f"pruned model: {result.out / 'hf'}")
