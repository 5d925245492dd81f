"""What an export back-end produced."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path


def path_size(path: Path) -> int:
    """Bytes on disk of a file, or of every file under a folder."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@dataclass
class Artifact:
    """One exported model: a file or a folder, relative to the output folder."""

    path: str
    format: str  # "hf" | "gguf" | "onnx"
    quant: str | None
    pruned: bool
    layers: int
    size_bytes: int
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)
