"""Model families as data: one row per family, no per-family branches elsewhere.

A row says where the decoder blocks live in the torch module tree, which config key
counts them, which config lists hold one entry per layer (and so must be sliced when
layers go), how a checkpoint tensor name carries its layer index, and which GGUF
architecture llama.cpp knows the family by.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class ArchitectureSpec:
    """How one model family lays out its decoder layers."""

    model_type: str
    display_name: str
    gguf_arch: str
    layers_path: str = "model.layers"
    num_layers_key: str = "num_hidden_layers"
    per_layer_config_keys: tuple[str, ...] = ("layer_types",)
    tensor_layer_pattern: str = r"^model\.layers\.(\d+)\."
    # llama.cpp's "llama" graph rotates adjacent pairs, Hugging Face rotates halves:
    # q/k projection rows must be interleaved when converting to GGUF.
    gguf_permute_qk: bool = False
    # Linear healing (healing.py) merges a patch into one layer's MLP down projection. That
    # is exact only when the MLP's output is added straight to the residual stream (no
    # norm after the MLP, as Gemma 2/3 have) and there is an MLP at all (not Mamba).
    mlp_path: str | None = "mlp"  # the MLP module inside a decoder block
    down_proj_path: str | None = "mlp.down_proj"  # its output projection (an nn.Linear)
    gguf_down_proj: str = "ffn_down"  # that projection's GGUF tensor name in blk.N.
    mlp_feeds_residual: bool = True  # False when a norm sits between MLP and residual
    final_norm_path: str = "model.norm"  # the norm before the LM head
    examples: tuple[str, ...] = field(default_factory=tuple)

    @property
    def tensor_regex(self) -> re.Pattern[str]:
        return re.compile(self.tensor_layer_pattern)

    def layer_of(self, tensor_name: str) -> int | None:
        """Layer index a checkpoint tensor belongs to, or None for embeddings, norms, head."""
        match = self.tensor_regex.match(tensor_name)
        return int(match.group(1)) if match else None

    def renumber(self, tensor_name: str, new_index: int) -> str:
        """The tensor name with its layer index replaced by ``new_index``."""
        match = self.tensor_regex.match(tensor_name)
        if match is None:
            return tensor_name
        start, end = match.span(1)
        return f"{tensor_name[:start]}{new_index}{tensor_name[end:]}"

    @property
    def healable(self) -> bool:
        return bool(self.mlp_path and self.down_proj_path and self.mlp_feeds_residual)

    def down_proj_tensor(self, layer: int) -> str:
        """Checkpoint name of a layer's MLP down projection weight."""
        return f"{self.layers_path}.{layer}.{self.down_proj_path}.weight"

    def decoder_layers(self, model):
        """The ``nn.ModuleList`` of decoder blocks of a loaded model."""
        module = model
        for attr in self.layers_path.split("."):
            module = getattr(module, attr)
        return module


def submodule(root, path: str):
    """``root.a.b.c`` for ``path`` ``"a.b.c"``."""
    for attr in filter(None, path.split(".")):
        root = getattr(root, attr)
    return root


ARCHITECTURES: dict[str, ArchitectureSpec] = {
    spec.model_type: spec
    for spec in (
        ArchitectureSpec(
            "llama",
            "Llama",
            gguf_arch="llama",
            gguf_permute_qk=True,
            examples=("meta-llama/Llama-3.2-1B", "HuggingFaceTB/SmolLM2-135M-Instruct"),
        ),
        ArchitectureSpec(
            "mistral",
            "Mistral",
            gguf_arch="llama",
            gguf_permute_qk=True,
            examples=("mistralai/Mistral-7B-v0.3",),
        ),
        ArchitectureSpec(
            "qwen2", "Qwen2 / Qwen2.5", gguf_arch="qwen2", examples=("Qwen/Qwen2.5-0.5B",)
        ),
        ArchitectureSpec("qwen3", "Qwen3", gguf_arch="qwen3", examples=("Qwen/Qwen3-0.6B",)),
    )
}


def supported_families() -> list[str]:
    return sorted(ARCHITECTURES)


def spec_for(model_type: str | None) -> ArchitectureSpec:
    """The table row for ``model_type``; raises with the supported list if there is none."""
    spec = ARCHITECTURES.get(model_type or "")
    if spec is None:
        raise UnsupportedArchitectureError(
            f"unsupported model family {model_type!r}",
            hint=f"supported families: {', '.join(supported_families())}",
        )
    return spec
