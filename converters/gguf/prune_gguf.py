"""Prune a GGUF file directly: drop ``blk.N.*`` tensors, renumber, slice per-layer metadata.

Works for any architecture llama.cpp knows, since only the ``blk.N.`` naming convention
and ``{arch}.block_count`` are assumed. Tensor data is copied byte for byte from the
source file inside the kernel, as a plain file copy is (:func:`write_gguf`).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, NamedTuple

from shortgpt_export.errors import CorruptModelError, ExportError, PlanError
from shortgpt_export.gguf_file import GGUFInfo, gguf_info, open_gguf
from shortgpt_export.planning import Plan
from shortgpt_export.progress import ProgressFactory, no_progress

from .metadata import size_label
from .packing import fast_writer_class

log = logging.getLogger(__name__)

BLOCK = re.compile(r"^blk\.(\d+)\.")
SKIPPED_KEYS = ("GGUF.", "general.architecture")  # the reader's pseudo-fields; the writer adds arch


def copied_fields(reader, drop: tuple[str, ...] = ()) -> list[tuple]:
    """(key, value, type, sub_type) of every field of ``reader`` but the pseudo-fields and
    the keys in ``drop``, as :func:`write_gguf` takes them."""
    return [
        (field.name, field.contents(), field.types[0], (field.types[1:] or (None,))[0])
        for field in reader.fields.values()
        if not field.name.startswith(SKIPPED_KEYS) and field.name not in drop
    ]


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


class Encoded(NamedTuple):
    """Tensor bytes already in a GGML type (``data``: gguf-py's quantizer output, uint8
    rows of blocks, or float16/float32 values), written as they are."""

    data: Any  # numpy array
    tensor_type: Any  # gguf.GGMLQuantizationType


def _nbytes(tensor) -> int:
    """Data size of a source tensor (ReaderTensor), an Encoded one or a healed array."""
    if isinstance(tensor, Encoded):
        return int(tensor.data.nbytes)
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

    patches = dict(patches or {})

    reader = open_gguf(src)
    info = gguf_info(reader)
    if info.block_count != plan.num_layers:
        raise PlanError(
            f"the plan is for {plan.num_layers} layers but {src} has {info.block_count}",
            hint="use the plan.json made for this model",
        )
    new_index = {old: new for new, old in enumerate(plan.keep)}
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
    if patches:
        raise PlanError(f"healed tensors {sorted(patches)} are not in {src}")
    fields = []
    for key, value, vtype, sub_type in sliced_metadata(reader, info.arch, plan.keep):
        if key == "general.size_label":  # the pruned model's size, not the source's
            value = size_label(sum(_elements(t) for _, t in kept))
        fields.append((key, value, vtype, sub_type))
    fields += [
        (key, value, None, None)
        for key, value in (arrays or {}).items()
        if reader.get_field(key) is None  # a source array was sliced above
    ]
    write_gguf(reader, dst, info.arch, fields, kept, progress=progress)
    return info


def write_gguf(reader, dst: Path, arch: str, fields, tensors, *, progress=no_progress) -> None:
    """Write ``dst`` from the open GGUF ``reader``: ``fields`` as (key, value, value type,
    item type) (value type None: an array whose item type is inferred) and ``tensors`` as
    (name, the reader's tensor, an :class:`Encoded` tensor or a float32 numpy array), in
    the source's byte order, at the alignment ``fields`` declare (``general.alignment``,
    else GGUF's 32 bytes). Encoded tensors are written to little-endian files only.

    A reader's tensor is copied from the source file inside the kernel, byte for byte
    (``safetensors_io.RangeCopier``: neighbours in the source in one call, nothing read
    into this process); arrays are written as F32.
    """
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFEndian

    from shortgpt_export.safetensors_io import RangeCopier, write_all

    big = reader.endian == ">"
    tensors = [
        (name, np.ascontiguousarray(t, dtype=np.float32) if isinstance(t, np.ndarray) else t)
        for name, t in tensors
    ]
    writer = fast_writer_class()(dst, arch, endianess=GGUFEndian.BIG if big else GGUFEndian.LITTLE)
    for key, value, vtype, sub_type in fields:
        if vtype is None:
            writer.add_array(key, value)
        else:
            writer.add_key_value(key, value, vtype, sub_type=sub_type)
        if key == "general.alignment":  # the layout the file declares
            writer.data_alignment = int(value)
    for name, tensor in tensors:
        if isinstance(tensor, Encoded):
            if big:
                raise ExportError(f"cannot write {name} pre-encoded into a big-endian GGUF")
            data = tensor.data
            writer.add_tensor_info(name, data.shape, data.dtype, data.nbytes, tensor.tensor_type)
        elif isinstance(tensor, np.ndarray):
            f32 = GGMLQuantizationType.F32
            writer.add_tensor_info(name, tensor.shape, tensor.dtype, tensor.nbytes, f32)
        else:
            data = tensor.data
            writer.add_tensor_info(name, data.shape, data.dtype, data.nbytes, tensor.tensor_type)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        fout = writer.fout[0]
        fout.flush()  # from here on the tensor data goes straight to the file descriptor
        fd, position = fout.fileno(), fout.tell()
        sizes = [_nbytes(t) for _, t in tensors]
        with (
            progress(f"writing {dst.name}", sum(sizes)) as advance,
            RangeCopier(fd) as copier,
        ):
            for (_, tensor), size in zip(tensors, sizes, strict=True):
                if pad := -position % writer.data_alignment:
                    copier.flush()
                    write_all(fd, bytes(pad))
                if isinstance(tensor, Encoded):
                    copier.flush()
                    write_all(fd, np.ascontiguousarray(tensor.data).tobytes())
                elif isinstance(tensor, np.ndarray):
                    copier.flush()
                    write_all(fd, tensor.astype(">f4" if big else "<f4").tobytes())
                else:
                    copier.add(reader.path, tensor.start, tensor.start + size)
                position += pad + size
                advance(size)
            copier.flush()
            if tensors and (pad := -position % writer.data_alignment):  # as GGUFWriter pads
                write_all(fd, bytes(pad))
    finally:
        writer.close()
