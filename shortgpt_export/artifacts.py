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

    @classmethod
    def written(
        cls, path: Path, format: str, quant: str | None, plan, extra: dict | None = None
    ) -> Artifact:
        """The record of ``path`` (a file or folder in the output folder) made under ``plan``."""
        return cls(
            path=Path(path).name,
            format=format,
            quant=quant,
            pruned=bool(plan.remove),
            layers=len(plan.keep),
            size_bytes=path_size(path),
            extra=extra or {},
        )

    def to_dict(self) -> dict:
        return asdict(self)
