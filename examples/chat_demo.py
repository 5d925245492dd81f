"""Ask the original and the pruned GGUF the same question, side by side, in llama.cpp.

python examples/chat_demo.py OUT_DIR [QUESTION]

OUT_DIR is a folder written by ``shortgpt-export --to gguf --q4_k_m --out OUT_DIR``; the
original is the built-in default model. Both answer through the chat template stored in
their own GGUF, with greedy decoding.
"""

import sys
from pathlib import Path

from llama_cpp import Llama
from rich.console import Console
from rich.table import Table

from shortgpt_export.default_model import default_model_path

QUESTION = "What is the capital of France? Answer in one sentence."


def answer(path: Path, question: str) -> str:
    llm = Llama(model_path=str(path), n_ctx=512, verbose=False, seed=0)
    try:
        reply = llm.create_chat_completion(
            messages=[{"role": "user", "content": question}], temperature=0.0, max_tokens=48
        )
    finally:
        llm.close()
    return reply["choices"][0]["message"]["content"].strip()


def main() -> int:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("demo-out")
    question = sys.argv[2] if len(sys.argv) > 2 else QUESTION
    pruned = sorted(out.glob("*-Q4_K_M.gguf"))
    if not pruned:
        print(f"error: no *-Q4_K_M.gguf in {out} (run shortgpt-export --to gguf --q4_k_m)")
        return 2
    original = default_model_path()
    table = Table(title=f"Q: {question}", show_lines=True)
    for column in ("model", "size", "answer"):
        table.add_column(column)
    for label, path in (("original", original), ("pruned", pruned[0])):
        size = f"{path.stat().st_size / 1e6:.0f} MB"
        reply = answer(path, question) or "(empty: the model ended its turn at once)"
        table.add_row(f"{label}\n{path.name}", size, reply)
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
