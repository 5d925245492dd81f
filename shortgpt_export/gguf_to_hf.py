"""A pruned Hugging Face folder from a GGUF source, one tensor at a time.

Each kept tensor is dequantized from the GGUF (offload's GGUFWeights: Hugging Face names,
llama.cpp's q/k row order undone), healed down projections taken from the plan's patch
file, converted to the output dtype and written, so the whole model is never in memory:
the path for a GGUF source scored layer by layer (``--offload layers``) and for
``prune`` of a GGUF source.
"""

from __future__ import annotations

from pathlib import Path

from .planning import Plan
from .progress import ProgressFactory, no_progress
from .safetensors_io import TORCH_DTYPES, ComputedTensor

SAFETENSORS_DTYPES = {torch_name: name for name, torch_name in TORCH_DTYPES.items()}


def gguf_tensors(source, weights, dtype, patches: dict | None = None):
    """(tensors, class name): every tensor a Hugging Face checkpoint of ``source`` holds
    (a tied LM head once) by name, each read from ``weights`` (gguf_layers.GGUFWeights)
    and cast to ``dtype`` when written (``patches``, by original layer, replace down
    projections); and the causal-LM class they belong to, for config.json."""
    import torch

    from .offload import module_path, skeleton

    model = skeleton(source.config, dtype)
    head = model.get_output_embeddings()
    skip = set()
    if head is not None and getattr(source.config, "tie_word_embeddings", False):
        # by name: a skeleton that ties the head would list it under the embeddings' name
        skip = {module_path(model, head) + ".weight"}
    buffers = dict(model.named_buffers())  # computed on the CPU by the skeleton
    down = {source.spec.down_proj_tensor(p): w for p, w in (patches or {}).items()}
    st_dtype = SAFETENSORS_DTYPES[str(dtype).removeprefix("torch.")]

    def produce(name: str, shape: tuple[int, ...]):
        if name in down:
            tensor = down[name]
        elif name in buffers:
            tensor = buffers[name]
        else:
            tensor = weights.tensor(name, shape)
        return tensor.to(dtype).contiguous().view(torch.uint8).numpy()

    tensors = {
        name: ComputedTensor(
            name, st_dtype, tuple(meta.shape), lambda n=name, s=tuple(meta.shape): produce(n, s)
        )
        for name, meta in model.state_dict().items()
        if name not in skip
    }
    return tensors, type(model).__name__


def write_gguf_as_pruned_hf(
    source,
    plan: Plan,
    out_dir: Path,
    *,
    dtype=None,
    tokenizer=None,
    max_shard_bytes: int,
    progress: ProgressFactory = no_progress,
) -> None:
    """Write the pruned model of a GGUF ``source`` into ``out_dir`` as safetensors shards,
    config.json, generation_config.json and the tokenizer (``tokenizer``, else the GGUF's),
    in ``dtype`` (default float32)."""
    import torch
    from transformers import GenerationConfig

    from .gguf_layers import GGUFWeights
    from .offload import load_tokenizer
    from .pruning import prune_config_dict, write_pruned_safetensors

    dtype = dtype or torch.float32
    weights = GGUFWeights(Path(source.path), source.spec, source.config)
    try:
        patches = plan.patch_weights(source.spec)
        tensors, architecture = gguf_tensors(source, weights, dtype, patches)
        write_pruned_safetensors(
            tensors, source.spec, plan, out_dir, max_shard_bytes=max_shard_bytes,
            progress=progress,
        )  # fmt: skip
    finally:
        weights.close()
    pruned = prune_config_dict(source.config_dict(), source.spec, plan.keep)
    config = type(source.config).from_dict(pruned)
    config.architectures = config.architectures or [architecture]
    config.dtype = dtype
    config.save_pretrained(out_dir)  # as a model's save_pretrained writes it
    GenerationConfig.from_model_config(source.config).save_pretrained(out_dir)
    (tokenizer or load_tokenizer(source)).save_pretrained(out_dir)
