"""``--converter llama.cpp``: llama.cpp's own convert_hf_to_gguf.py on the pruned folder."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from shortgpt_export.errors import ExportError, ShortGPTError

log = logging.getLogger(__name__)


def convert_script() -> Path:
    """``$LLAMA_CPP_DIR/convert_hf_to_gguf.py``; raises with the fix when it is not there."""
    root = os.environ.get("LLAMA_CPP_DIR")
    if not root:
        raise ShortGPTError(
            "--converter llama.cpp needs the environment variable LLAMA_CPP_DIR",
            hint="point LLAMA_CPP_DIR at a llama.cpp checkout",
        )
    script = Path(root).expanduser() / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise ShortGPTError(
            f"{script} does not exist",
            hint="LLAMA_CPP_DIR must be the root of a llama.cpp checkout",
        )
    return script


def convert_with_llama_cpp(ctx, target: Path, *, out_type: str = "F16") -> None:
    """Write the pruned HF folder next to ``target``, then run llama.cpp's converter on it."""
    script = convert_script()
    folder = target.parent / "pruned-hf"
    ctx.write_pruned_hf(folder)
    cmd = [
        sys.executable,
        str(script),
        str(folder),
        "--outfile",
        str(target),
        "--outtype",
        out_type.lower(),
    ]
    log.info("running %s", " ".join(cmd))
    with ctx.progress("llama.cpp convert_hf_to_gguf.py", None):
        result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 or not target.is_file():
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ExportError(f"convert_hf_to_gguf.py failed (exit {result.returncode}): {tail[0]}")
    for path in sorted(folder.iterdir()):
        path.unlink()
    folder.rmdir()
