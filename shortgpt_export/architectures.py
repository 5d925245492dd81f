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
    # GGUF from safetensors: "builtin" (converters/gguf/hf_to_gguf.py, streaming), "llama.cpp"
    # (llama.cpp's convert_hf_to_gguf.py in a subprocess), or None: refused, for ``gguf_note``.
    gguf_converter: str | None = "llama.cpp"
    gguf_note: str = ""
    # llama.cpp derives this family's sliding/global attention pattern from the layer index
    # with this period (layer i is global when i % period == period - 1), unless the GGUF
    # carries ``{arch}.attention.sliding_window_pattern`` and llama.cpp reads it for the
    # arch (``gguf_swa_per_layer``, measured). Without that, a removal must keep every kept
    # layer's attention type at its new index (converters/gguf/attention_pattern.py).
    gguf_swa_period: int | None = None
    gguf_swa_per_layer: bool = False
    # llama.cpp runs this family's sliding window (its converter writes it). Where not, a
    # config with one gets a warning on GGUF export: the GGUF attends to the full context.
    gguf_sliding_window: bool = False
    # llama.cpp's graph for this arch has experts in every layer: a pruned model that keeps
    # a dense-MLP layer (Qwen-MoE ``mlp_only_layers`` / ``decoder_sparse_step``) is refused.
    gguf_moe_only: bool = False
    # Tensors that sit in a layer's namespace but belong to the stack's first block
    # whichever it is (RWKV's pre_ln in blocks.0): they stay at index 0 when 0 is removed.
    first_block_modules: tuple[str, ...] = ()
    # What a block returns after its hidden state, where the model's layer loop unpacks
    # more than one output (RWKV: ``hidden, state, attentions = block(...)``): the recording
    # pass (layerwise.py) hands back, per entry, that keyword argument of the call or None.
    block_extra_outputs: tuple[str | None, ...] = ()
    # What the model's forward does to the LM head's output, as (operation of LOGIT_OPS,
    # config key) pairs applied in order when the key is set (Gemma 2's soft cap, Granite's
    # scaling): the layer-by-layer passes (layerwise.Stack.logits) compute the same logits.
    logit_transforms: tuple[tuple[str, str], ...] = ()
    examples: tuple[str, ...] = field(default_factory=tuple)

    @property
    def tensor_regex(self) -> re.Pattern[str]:
        return re.compile(self.tensor_layer_pattern)

    def layer_of(self, tensor_name: str) -> int | None:
        """Layer index a checkpoint tensor belongs to, or None for embeddings, norms, head
        (and for the first block's own modules, which stay where they are)."""
        match = self.tensor_regex.match(tensor_name)
        if match is None:
            return None
        rest = tensor_name[match.end() :]
        if match.group(1) == "0" and rest.startswith(
            tuple(f"{m}." for m in self.first_block_modules)
        ):
            return None
        return int(match.group(1))

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

    def output_logits(self, config, logits):
        """``logits`` (the LM head's output) as the model's forward returns them."""
        for op, key in self.logit_transforms:
            value = getattr(config, key, None)
            if value is not None:
                logits = LOGIT_OPS[op](logits, float(value))
        return logits

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


LOGIT_OPS = {
    "softcap": lambda logits, cap: (logits / cap).tanh() * cap,
    "divide": lambda logits, scale: logits / scale,
}
SOFTCAP = {"logit_transforms": (("softcap", "final_logit_softcapping"),)}

SSM = {"mlp_path": None, "down_proj_path": None}
MOE = {"down_proj_path": None}  # experts, no single down projection to patch
POST_MLP_NORM = {"mlp_feeds_residual": False}  # a norm (or scale) between MLP and residual

ARCHITECTURES: dict[str, ArchitectureSpec] = {
    spec.model_type: spec
    for spec in (
        ArchitectureSpec(
            "llama",
            "Llama",
            gguf_arch="llama",
            gguf_permute_qk=True,
            gguf_converter="builtin",
            examples=("meta-llama/Llama-3.2-1B", "HuggingFaceTB/SmolLM2-135M-Instruct"),
        ),
        ArchitectureSpec(
            "mistral",
            "Mistral",
            gguf_arch="llama",
            gguf_permute_qk=True,
            gguf_converter="builtin",
            examples=("mistralai/Mistral-7B-v0.3",),
        ),
        ArchitectureSpec(
            "qwen2",
            "Qwen2 / Qwen2.5",
            gguf_arch="qwen2",
            gguf_converter="builtin",
            examples=("Qwen/Qwen2.5-0.5B",),
        ),
        ArchitectureSpec(
            "qwen3",
            "Qwen3",
            gguf_arch="qwen3",
            gguf_converter="builtin",
            examples=("Qwen/Qwen3-0.6B",),
        ),
        ArchitectureSpec(
            "gemma2",
            "Gemma 2",
            gguf_sliding_window=True,
            gguf_arch="gemma2",
            gguf_swa_period=2,
            gguf_swa_per_layer=True,  # llama-cpp-python 0.3.36 reads the array (tested)
            **POST_MLP_NORM,
            **SOFTCAP,
            examples=("google/gemma-2-2b-it",),
        ),
        ArchitectureSpec(
            "gemma3_text",
            "Gemma 3 (text)",
            gguf_sliding_window=True,
            gguf_arch="gemma3",
            gguf_swa_period=6,
            gguf_swa_per_layer=True,  # llama-cpp-python 0.3.36 reads the array (tested)
            **POST_MLP_NORM,
            **SOFTCAP,
            examples=("google/gemma-3-1b-it",),
        ),
        ArchitectureSpec(
            "phi3",
            "Phi-3 / 3.5 / 4-mini",
            gguf_sliding_window=True,
            gguf_arch="phi3",
            examples=("microsoft/Phi-4-mini-instruct",),
        ),
        ArchitectureSpec(
            "granite",
            "Granite",
            gguf_arch="granite",
            **POST_MLP_NORM,  # the MLP output is scaled by residual_multiplier
            logit_transforms=(("divide", "logits_scaling"),),
            examples=("ibm-granite/granite-3.3-2b-instruct",),
        ),
        ArchitectureSpec(
            "olmo2",
            "OLMo 2",
            gguf_arch="olmo2",
            **POST_MLP_NORM,
            examples=("allenai/OLMo-2-0425-1B",),
        ),
        ArchitectureSpec(
            "mixtral",
            "Mixtral",
            gguf_arch="llama",
            mlp_path="block_sparse_moe",
            **MOE,
            examples=("mistralai/Mixtral-8x7B-v0.1",),
        ),
        ArchitectureSpec(
            "qwen2_moe",
            "Qwen2-MoE",
            gguf_arch="qwen2moe",
            gguf_moe_only=True,
            **MOE,
            examples=("Qwen/Qwen1.5-MoE-A2.7B",),
        ),
        ArchitectureSpec(
            "qwen3_moe",
            "Qwen3-MoE",
            gguf_arch="qwen3moe",
            gguf_moe_only=True,
            **MOE,
            examples=("Qwen/Qwen3-30B-A3B",),
        ),
        ArchitectureSpec(
            "mamba",
            "Mamba",
            gguf_arch="mamba",
            layers_path="backbone.layers",
            tensor_layer_pattern=r"^backbone\.layers\.(\d+)\.",
            final_norm_path="backbone.norm_f",
            **SSM,
            examples=("state-spaces/mamba-130m-hf",),
        ),
        ArchitectureSpec(
            "mamba2",
            "Mamba-2",
            gguf_arch="mamba2",
            layers_path="backbone.layers",
            tensor_layer_pattern=r"^backbone\.layers\.(\d+)\.",
            final_norm_path="backbone.norm_f",
            **SSM,
            examples=("AntonV/mamba2-130m-hf",),
        ),
        ArchitectureSpec(
            "rwkv",
            "RWKV-4",
            gguf_arch="rwkv",
            layers_path="rwkv.blocks",
            tensor_layer_pattern=r"^rwkv\.blocks\.(\d+)\.",
            final_norm_path="rwkv.ln_out",
            block_extra_outputs=("state", None),
            first_block_modules=("pre_ln",),
            gguf_converter=None,
            gguf_note="transformers reads RWKV-4 checkpoints, and llama.cpp runs only RWKV-6/7",
            **SSM,
            examples=("RWKV/rwkv-4-169m-pile",),
        ),
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


@dataclass(frozen=True)
class TextModelOf:
    """A multimodal checkpoint whose language model is what gets pruned: where its text
    config and text-model tensors sit. The text model is loaded, pruned and exported as a
    plain causal LM of its own family; the other towers are left behind."""

    model_type: str  # the checkpoint's config.json model_type
    text_config_key: str  # config key that holds the text model's config
    text_architecture: str  # the causal-LM class the text model is written as
    # checkpoint tensor-name prefix -> the text model's prefix; tensors matching none
    # (vision tower, projector) are dropped. First match wins.
    tensor_prefixes: tuple[tuple[str, str], ...]
    dropped: str  # what is left behind, for the log line
    # companion files that describe the dropped towers (image processor), not copied
    dropped_files: tuple[str, ...] = ("preprocessor_config.json", "processor_config.json")

    def text_tensor_name(self, name: str) -> str | None:
        """The text model's name for a checkpoint tensor, or None when it is not the text
        model's."""
        for old, new in self.tensor_prefixes:
            if name.startswith(old):
                return new + name[len(old) :]
        return None


TEXT_MODELS: dict[str, TextModelOf] = {
    row.model_type: row
    for row in (
        # Gemma3ForConditionalGeneration: transformers 4.5x saves (and the hub checkpoints
        # hold) language_model.model.* and, untied, language_model.lm_head; the in-memory
        # layout, which later versions may save, is model.language_model.* and lm_head.
        TextModelOf(
            "gemma3",
            text_config_key="text_config",
            text_architecture="Gemma3ForCausalLM",
            tensor_prefixes=(
                ("language_model.model.", "model."),
                ("model.language_model.", "model."),
                ("language_model.lm_head.", "lm_head."),
                ("lm_head.", "lm_head."),
            ),
            dropped="vision tower and multimodal projector",
        ),
    )
}
