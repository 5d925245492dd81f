"""``general.*`` metadata of a written GGUF: the source's fields, sized for the pruned model."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def size_label(parameters: int) -> str:
    """llama.cpp's size label for a parameter count (``106M``, ``1.2B``)."""
    from gguf.utility import size_label as label

    return label(parameters, 0, 0, 0)


def add_general_metadata(writer, folder: Path, name: str, parameters: int) -> None:
    """``general.*`` from a safetensors source folder, as llama.cpp's converter sets them
    (model card front matter: licence, base model, tags, languages; config name parts),
    with ``general.size_label`` counting the ``parameters`` of the pruned model."""
    import gguf

    meta = gguf.Metadata.load(None, folder, name, parameters)
    meta.size_label = size_label(parameters)
    meta.set_gguf_meta_model(writer)
    log.info("general.size_label %s (%d parameters)", meta.size_label, parameters)
