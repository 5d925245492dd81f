"""Seeded fuzzing: damaged copies of a tiny safetensors model and of a tiny GGUF.

200 cases (100 per format): random truncations and random byte flips, placed mostly in
the header (where parsers make decisions) and some anywhere. Each case runs the whole
command line on the damaged model with ``--dry-run --no-verify`` and a tiny calibration:
file checks, header parsing, config reading, model and tokenizer loading, scoring, plan
writing. The cases run in one worker process (importing torch once instead of 200 times)
under an address-space limit (``resource.setrlimit``) and a per-case alarm. Every case
must end with exit 0 or 2 in time, with no traceback, no MemoryError, no temporary folder
left, and no output folder after a refusal.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import export_with_cli

REPO = Path(__file__).resolve().parents[1]
CASES_PER_FORMAT = 100
SEED = 9
CASE_TIMEOUT_S = 60
EXTRA_ADDRESS_SPACE = 3 * 1024**3  # over what the worker maps after its imports
CLI_OPTIONS = ["--calib-tokens", "64", "--seq-len", "32", "--dry-run", "--no-verify"]


def safetensors_header_end(path: Path) -> int:
    with open(path, "rb") as fh:
        return 8 + struct.unpack("<Q", fh.read(8))[0]


def gguf_header_end(path: Path) -> int:
    from gguf import GGUFReader

    return int(GGUFReader(path).data_offset)


def mutations(rng: random.Random, size: int, header_end: int, count: int) -> list[dict]:
    """``count`` truncations or 1-4 byte flips, 3 in 4 of them inside the header."""
    found = []
    for _ in range(count):
        span = header_end if rng.random() < 0.75 else size
        if rng.random() < 0.4:
            found.append({"truncate": rng.randrange(0, span)})
        else:
            flips = [
                [rng.randrange(0, span), rng.randrange(1, 256)] for _ in range(rng.randint(1, 4))
            ]
            found.append({"flips": flips})
    return found


@pytest.fixture(scope="module")
def tiny_gguf(tiny_llama_dir, tmp_path_factory) -> Path:
    out = export_with_cli(
        tiny_llama_dir,
        tmp_path_factory.mktemp("fuzz-gguf"),
        "--to",
        "gguf",
        "--quant",
        "F16",
        "--no-verify",
        "--remove",
        "1",
    )
    return next(out.glob("*.gguf"))


def test_fuzzed_models_end_in_exit_0_or_2(tmp_path, tiny_llama_dir, tiny_gguf, calib_file):
    rng = random.Random(SEED)
    clean_gguf = tmp_path / "clean.gguf"
    shutil.copy(tiny_gguf, clean_gguf)
    sources = {
        "safetensors": (
            tiny_llama_dir / "model.safetensors",
            safetensors_header_end(tiny_llama_dir / "model.safetensors"),
        ),
        "gguf": (clean_gguf, gguf_header_end(clean_gguf)),
    }
    cases = []
    for kind, (source, header_end) in sources.items():
        size = source.stat().st_size
        for index, change in enumerate(mutations(rng, size, header_end, CASES_PER_FORMAT)):
            root = tmp_path / f"{kind}-{index}"
            root.mkdir()
            if kind == "safetensors":
                model = Path(shutil.copytree(tiny_llama_dir, root / "model"))
                target = model / "model.safetensors"
            else:
                model = target = root / "model.gguf"
            out = root / "out"
            argv = [str(model), "--calib", calib_file, "--out", str(out), *CLI_OPTIONS]
            cases.append(
                {
                    "name": f"{kind}-{index} {change}",
                    "source": str(source),
                    "target": str(target),
                    "root": str(root),
                    "out": str(out),
                    "argv": argv,
                    **change,
                }
            )
    warm_root = tmp_path / "warmup"
    warm_root.mkdir()
    warmup = {
        "name": "warmup",
        "root": str(warm_root),
        "out": str(warm_root / "out"),
        "argv": [
            str(clean_gguf),
            "--calib",
            calib_file,
            "--out",
            str(warm_root / "out"),
            *CLI_OPTIONS,
        ],
    }
    job = tmp_path / "job.json"
    job.write_text(
        json.dumps(
            {
                "cases": cases,
                "warmup": warmup,
                "timeout": CASE_TIMEOUT_S,
                "extra_address_space": EXTRA_ADDRESS_SPACE,
            }
        )
    )
    results_path = tmp_path / "results.json"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    subprocess.run(
        [sys.executable, str(REPO / "tests" / "fuzz_worker.py"), str(job), str(results_path)],
        env=env,
        timeout=900,
        check=True,
    )
    results = json.loads(results_path.read_text())["results"]
    assert results[0]["code"] == 0, results[0]  # the clean GGUF passes
    assert len(results) == 2 * CASES_PER_FORMAT + 1
    failures = [
        r
        for r in results[1:]
        if r["error"] is not None
        or r["code"] not in (0, 2)
        or "Traceback" in r["stderr"]
        or "MemoryError" in r["stderr"]
        or r["leftovers"]
        or (r["code"] == 2 and r["out_exists"])
    ]
    assert failures == [], json.dumps(failures[:5], indent=1)
    codes = [r["code"] for r in results[1:]]
    assert codes.count(2) >= 50  # most damage is caught; flips in tensor data still load
