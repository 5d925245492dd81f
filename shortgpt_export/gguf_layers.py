"""Hugging Face tensors of a GGUF file, dequantized one at a time (layer streaming).

The file is memory-mapped (gguf_file.GGUFFile); a tensor is dequantized only when asked for,
by its Hugging Face name. llama-style architectures store the q/k projection rows
interleaved for llama.cpp's rotary layout; those are put back in Hugging Face order,
as transformers does when it loads the whole GGUF.
"""

from __future__ import annotations

import math
from pathlib import Path

from .architectures import ArchitectureSpec
from .errors import CorruptModelError


def _arch_enum(name: str):
    import gguf

    for arch, arch_name in gguf.MODEL_ARCH_NAMES.items():
        if arch_name == name:
            return arch
    raise CorruptModelError(f"gguf does not know architecture {name!r}")


def deinterleave_rope_rows(weight, heads: int):
    """Inverse of the q/k row interleave of the GGUF export: adjacent pairs back to
    rotate-half layout, per head."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


class GGUFWeights:
    """Tensors of a GGUF file by Hugging Face name, dequantized to float32 on request."""

    def __init__(self, path: Path, spec: ArchitectureSpec, config):
        import gguf

        from .gguf_file import open_gguf

        self.reader = open_gguf(path)  # header bounds-checked first
        field = self.reader.fields.get("general.architecture")
        arch = field.contents() if field is not None else spec.gguf_arch
        self.path = path
        self.tensors = {t.name: t for t in self.reader.tensors}
        layers = int(getattr(config, spec.num_layers_key))
        self.names = gguf.get_tensor_name_map(_arch_enum(arch), layers)
        self.permute = spec.gguf_permute_qk
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)

    def gguf_name(self, name: str) -> str:
        gguf_name = self.names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None or gguf_name not in self.tensors:
            raise CorruptModelError(
                f"{self.path} has no tensor for {name!r} ({gguf_name or 'no GGUF name'})",
                hint="check that the GGUF file is complete",
            )
        return gguf_name

    def tensor(self, name: str, shape):
        """The float32 tensor of Hugging Face parameter ``name``, reshaped to ``shape``."""
        import gguf
        import numpy as np
        import torch

        gguf_name = self.gguf_name(name)
        info = self.tensors[gguf_name]
        array = gguf.quants.dequantize(info.data, info.tensor_type)
        if array.size != math.prod(shape):
            raise CorruptModelError(
                f"{gguf_name} holds {array.size} values, {name} needs shape {tuple(shape)}",
                hint="check that the GGUF metadata matches its tensors",
            )
        array = array.reshape(shape)
        if self.permute and gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = self.heads if gguf_name.endswith("attn_q.weight") else self.kv_heads
            array = deinterleave_rope_rows(array, heads)
        return torch.from_numpy(np.array(array, dtype=np.float32, order="C", copy=True))

    def rows(self, name: str, ids, shape):
        """Rows ``ids`` of a 2-D tensor, dequantized alone (embeddings are never permuted)."""
        import gguf
        import numpy as np
        import torch

        info = self.tensors[self.gguf_name(name)]
        if len(shape) != 2 or info.data.ndim != 2 or info.data.shape[0] != shape[0]:
            return None
        array = gguf.quants.dequantize(info.data[ids.numpy()], info.tensor_type)
        return torch.from_numpy(np.array(array, dtype=np.float32, copy=True).reshape(-1, shape[1]))

    def close(self) -> None:
        self.tensors = {}
        self.reader = None
