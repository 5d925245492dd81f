"""Run many damaged-model cases through the CLI in one process (see test_fuzz_inputs.py).

Usage: ``python fuzz_worker.py JOB.json RESULTS.json``. The job lists cases (a damaged
copy of a model and the CLI arguments); each runs in this process under an alarm
timeout, after an address-space limit is set for the whole worker. Importing torch and
transformers once instead of per case is what keeps 200 cases within a couple of minutes.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import resource
import signal
import sys
import time
import traceback
from pathlib import Path

TEMP_NAME = re.compile(r"\.(tmp|old)-\d+$|^\.shortgpt-probe-")


class CaseTimeout(BaseException):
    """Raised by the alarm; a BaseException so that the CLI does not turn it into exit 2."""


def _alarm(signum, frame):
    raise CaseTimeout


def _vm_size() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def run_case(main, case: dict, timeout: int) -> dict:
    err = io.StringIO()
    started = time.perf_counter()
    result = {"name": case["name"], "code": None, "error": None}
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            result["code"] = main(case["argv"])
    except CaseTimeout:
        result["error"] = f"no answer within {timeout} s"
    except BaseException:  # noqa: BLE001 - any escape is what the fuzz test looks for
        result["error"] = traceback.format_exc()[-2000:]
    finally:
        signal.alarm(0)
    result["seconds"] = round(time.perf_counter() - started, 2)
    result["stderr"] = err.getvalue()[-1000:]
    root = Path(case["root"])
    result["leftovers"] = [str(p) for p in root.rglob("*") if TEMP_NAME.search(p.name)]
    result["out_exists"] = Path(case["out"]).exists()
    return result


def damage(case: dict) -> None:
    """Write ``case["target"]``: ``case["source"]`` truncated, or with bytes XOR-flipped."""
    data = bytearray(Path(case["source"]).read_bytes())
    if "truncate" in case:
        data = data[: case["truncate"]]
    for position, mask in case.get("flips", []):
        data[position] ^= mask
    Path(case["target"]).write_bytes(bytes(data))


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    from shortgpt_export.cli import main as cli_main

    results = [run_case(cli_main, job["warmup"], job["timeout"])]  # imports everything lazy
    limit = _vm_size() + job["extra_address_space"]
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    for case in job["cases"]:
        damage(case)
        results.append(run_case(cli_main, case, job["timeout"]))
    Path(sys.argv[2]).write_text(json.dumps({"limit": limit, "results": results}))


if __name__ == "__main__":
    main()
