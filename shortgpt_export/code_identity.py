"""What made a cached result besides its inputs: the versions of the libraries that
compute it and a hash of this package's source. The validation reference and the load
cache keep it, so an entry made by another version is rebuilt, never reused."""

from __future__ import annotations

import hashlib
from pathlib import Path

LIBRARIES = ("torch", "transformers", "gguf")


def code_identity(package: Path | None = None) -> str:
    """``"torch X, transformers Y, gguf Z, shortgpt_export source <hash>"``: versions from
    the installed metadata (no import), and a hash of every ``.py`` file under
    ``package`` (default: this package), about 4 ms."""
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for name in LIBRARIES:
        try:
            parts.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            parts.append(f"{name} absent")
    package = package or Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode())
        digest.update(path.read_bytes())
    parts.append(f"shortgpt_export source {digest.hexdigest()[:16]}")
    return ", ".join(parts)
