"""``--converter llama.cpp``: llama.cpp's own convert_hf_to_gguf.py on the pruned folder.

The script comes from ``$LLAMA_CPP_DIR`` when that is set. Otherwise it is taken from the
source distribution of the installed ``llama-cpp-python`` (which vendors llama.cpp at the
matching commit): ``shortgpt-export download-default`` (run by ``make install``) unpacks
``convert_hf_to_gguf.py``, its ``conversion`` package and ``gguf-py`` into the cache, and
a run that finds the cache empty does the same once.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path, PurePosixPath

from shortgpt_export.default_model import cache_dir
from shortgpt_export.errors import ExportError, ShortGPTError

log = logging.getLogger(__name__)

PACKAGE = "llama-cpp-python"
SCRIPT = "convert_hf_to_gguf.py"
# what convert_hf_to_gguf.py imports from its checkout, relative to vendor/llama.cpp/
NEEDED = (SCRIPT, "conversion/", "gguf-py/gguf/", "LICENSE")


def llama_cpp_version() -> str:
    """The installed llama-cpp-python version (the vendored llama.cpp follows it)."""
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError as exc:
        raise ShortGPTError(f"{PACKAGE} is not installed", hint=f"pip install {PACKAGE}") from exc


def cached_checkout(version: str | None = None) -> Path:
    """The cache folder that holds llama.cpp's converter for ``version``."""
    return cache_dir() / f"llama.cpp-{version or llama_cpp_version()}"


def _wanted(name: str) -> str | None:
    """The path below vendor/llama.cpp/ of an sdist member we keep, else None."""
    parts = PurePosixPath(name).parts
    if len(parts) < 4 or parts[1:3] != ("vendor", "llama.cpp") or ".." in parts:
        return None
    rel = "/".join(parts[3:])
    keep = any(rel == n or (n.endswith("/") and rel.startswith(n)) for n in NEEDED)
    return rel if keep and "__pycache__" not in parts else None


def unpack_converter(sdist: Path, target: Path) -> Path:
    """Copy the converter's files out of a llama-cpp-python sdist into ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    found = 0
    with tarfile.open(sdist) as tar:
        for member in tar:
            rel = _wanted(member.name)
            if rel is None or not member.isfile():
                continue
            dest = target / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src, open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst)
            found += 1
    if not (target / SCRIPT).is_file() or not (target / "conversion").is_dir():
        raise ShortGPTError(
            f"{sdist.name} does not carry vendor/llama.cpp/{SCRIPT} and conversion/",
            hint="set LLAMA_CPP_DIR to a llama.cpp checkout instead",
        )
    log.info("unpacked %d converter files into %s", found, target)
    return target


def fetch_converter(force: bool = False) -> Path:
    """Download the llama-cpp-python sdist with pip and cache its converter; returns the folder.

    Does nothing when the cache already holds the converter for the installed version.
    """
    version = llama_cpp_version()
    target = cached_checkout(version)
    if (target / SCRIPT).is_file() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.warning(
        "fetching llama.cpp's %s from the %s %s source distribution into %s (once)",
        SCRIPT,
        PACKAGE,
        version,
        target,
    )
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
            "--quiet", "-d", tmp, f"{PACKAGE}=={version}",
        ]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(Path(tmp).glob("*.tar.gz"))
        if result.returncode != 0 or not sdists:
            tail = (result.stderr.strip().splitlines() or ["no sdist downloaded"])[-1]
            raise ShortGPTError(
                f"pip could not download the {PACKAGE}=={version} source distribution: {tail}",
                hint="check that PyPI is reachable, or set LLAMA_CPP_DIR to a llama.cpp checkout",
            )
        staging = unpack_converter(sdists[0], Path(tmp) / "llama.cpp")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    return target


def convert_script(*, fetch: bool = True) -> Path:
    """``$LLAMA_CPP_DIR/convert_hf_to_gguf.py``, else the cached one (fetched once if allowed)."""
    root = os.environ.get("LLAMA_CPP_DIR")
    if root:
        script = Path(root).expanduser() / SCRIPT
        if not script.is_file():
            raise ShortGPTError(
                f"{script} does not exist",
                hint="LLAMA_CPP_DIR must be the root of a llama.cpp checkout, or unset it to "
                "use the converter that matches the installed llama-cpp-python",
            )
        return script
    script = cached_checkout() / SCRIPT
    if script.is_file():
        return script
    if not fetch:
        raise ShortGPTError(
            f"llama.cpp's {SCRIPT} is not in the cache ({script})",
            hint="run `shortgpt-export download-default`, or set LLAMA_CPP_DIR",
        )
    return fetch_converter() / SCRIPT


def convert_with_llama_cpp(ctx, target: Path, *, out_type: str = "F16") -> None:
    """Write the pruned HF folder next to ``target``, then run llama.cpp's converter on it."""
    folder = target.parent / "pruned-hf"
    ctx.write_pruned_hf(folder)
    try:
        run_converter(folder, target, out_type=out_type, progress=ctx.progress)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run_converter(folder: Path, target: Path, *, out_type: str = "F16", progress=None) -> None:
    """Run convert_hf_to_gguf.py on ``folder`` in a subprocess; raise ExportError on failure."""
    from contextlib import nullcontext

    script = convert_script()
    cmd = [sys.executable, str(script), str(folder), "--outfile", str(target)]
    cmd += ["--outtype", out_type.lower()]
    log.info("running %s", " ".join(cmd))
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)  # the script must use the gguf-py it ships with
    with progress(f"llama.cpp {SCRIPT}", None) if progress else nullcontext():
        result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0 or not target.is_file():
        lines = (result.stderr or result.stdout).strip().splitlines() or ["no output"]
        raise ExportError(
            f"{SCRIPT} failed on {folder.name} (exit {result.returncode}): {lines[-1][:300]}",
            hint="run with -v for the converter's log, or use the built-in converter",
        )
