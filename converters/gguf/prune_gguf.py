"""Prune a GGUF file directly: drop ``blk.N.*`` tensors, renumber, slice per-layer metadata.

Works for any architecture llama.cpp knows, since only the ``blk.N.`` naming convention
and ``{arch}.block_count`` are assumed. Tensor data is copied byte for byte from the
memory-mapped source, one tensor at a time.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from shortgpt_export.errors import CorruptModelError, PlanError
from shortgpt_export.gguf_file import GGUFInfo, field_value, gguf_info, open_gguf
from shortgpt_export.planning import Plan
from shortgpt_export.progress import ProgressFactory, no_progress

from .metadata import size_label

log = logging.getLogger(__name__)

BLOCK = re.compile(r"^blk\.(\d+)\.")
SKIPPED_KEYS = ("GGUF.", "general.architecture")  # the reader's pseudo-fields; the writer adds arch


def sliced_metadata(reader, arch: str, keep: list[int]):
    """(key, value, type, sub_type) of every field, per-layer arrays cut to ``keep``."""
    from gguf import GGUFValueType

    old = gguf_info(reader).block_count
    for field in reader.fields.values():
        if field.name.startswith(SKIPPED_KEYS):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        value = field.contents()
        if field.name == f"{arch}.block_count":
            value = len(keep)
        elif (
            vtype == GGUFValueType.ARRAY and field.name.startswith(f"{arch}.") and len(value) == old
        ):
            value = [value[i] for i in keep]
            log.info("sliced per-layer array %s to %d entries", field.name, len(keep))
        yield field.name, value, vtype, sub_type


def _elements(tensor) -> int:
    """Element count of a source tensor (ReaderTensor) or of a healed numpy array."""
    return int(tensor.n_elements if hasattr(tensor, "n_elements") else tensor.size)


def _nbytes(tensor) -> int:
    """Data size of a source tensor (ReaderTensor) or of a healed numpy array."""
    return int(tensor.n_bytes if hasattr(tensor, "n_bytes") else tensor.nbytes)


def prune_gguf(
    src: Path,
    plan: Plan,
    dst: Path,
    *,
    patches: dict | None = None,
    progress: ProgressFactory = no_progress,
    arrays: dict[str, list] | None = None,
) -> GGUFInfo:
    """Write ``dst``: ``src`` without the layers ``plan`` removes; returns the source's info.

    ``patches`` (healing) maps source tensor names to float arrays in numpy layout; those
    tensors are written as F32 in their place, every other tensor is copied byte for byte.
    ``arrays`` adds per-layer metadata arrays (already for the kept layers) that the
    source lacks, such as a derived attention pattern (attention_pattern.py).
    """
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter

    patches = dict(patches or {})

    reader = open_gguf(src)
    info = gguf_info(reader)
    if info.block_count != plan.num_layers:
        raise PlanError(
            f"the plan is for {plan.num_layers} layers but {src} has {info.block_count}",
            hint="use the plan.json made for this model",
        )
    new_index = {old: new for new, old in enumerate(plan.keep)}
    writer = GGUFWriter(dst, info.arch)
    alignment = field_value(reader, "general.alignment")
    if alignment:
        writer.data_alignment = int(alignment)
    kept = []
    for tensor in reader.tensors:
        match = BLOCK.match(tensor.name)
        name = tensor.name
        if match:
            layer = int(match.group(1))
            if layer >= info.block_count:
                raise CorruptModelError(f"{src}: tensor {name} is beyond block_count")
            if layer not in new_index:
                continue
            name = f"blk.{new_index[layer]}.{name[match.end() :]}"
        if tensor.name in patches:
            array = np.ascontiguousarray(patches.pop(tensor.name), dtype=np.float32)
            if array.shape != tuple(reversed([int(n) for n in tensor.shape])):
                raise PlanError(f"healed {tensor.name} has shape {array.shape}, not the source's")
            kept.append((name, array))
        else:
            kept.append((name, tensor))
    for key, value, vtype, sub_type in sliced_metadata(reader, info.arch, plan.keep):
        if key == "general.size_label":  # the pruned model's size, not the source's
            value = size_label(sum(_elements(t) for _, t in kept))
        writer.add_key_value(key, value, vtype, sub_type=sub_type)
    for key, value in (arrays or {}).items():
        if reader.get_field(key) is None:  # a source array was sliced above
            writer.add_array(key, value)
    for name, tensor in kept:
        if isinstance(tensor, np.ndarray):
            writer.add_tensor_info(
                name, tensor.shape, tensor.dtype, tensor.nbytes, GGMLQuantizationType.F32
            )
            continue
        writer.add_tensor_info(
            name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type
        )
    if patches:
        raise PlanError(f"healed tensors {sorted(patches)} are not in {src}")
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        sizes = [_nbytes(t) for _, t in kept]
        with progress(f"writing {dst.name}", sum(sizes)) as advance:
            for (_, tensor), size in zip(kept, sizes, strict=True):
                writer.write_tensor_data(tensor if isinstance(tensor, np.ndarray) else tensor.data)
                advance(size)
    finally:
        writer.close()
    return info
