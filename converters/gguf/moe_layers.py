"""Mixture-of-experts families whose llama.cpp graph has experts in every layer."""

from __future__ import annotations

from shortgpt_export.errors import ExportError
from shortgpt_export.pruning import prune_config_dict


def check_dense_layers(spec, config: dict, plan) -> None:
    """Raise, before any conversion, when ``spec``'s GGUF arch has no dense layers
    (``gguf_moe_only``) and the pruned model keeps one: llama.cpp's converter cannot map a
    dense layer's MLP tensors for these archs (Qwen2-MoE, Qwen3-MoE), pruned or not."""
    if not spec.gguf_moe_only:
        return
    dense = prune_config_dict(config, spec, plan.keep).get("mlp_only_layers") or []
    if not dense:
        return
    old = [plan.keep[i] for i in dense]
    everything = ",".join(map(str, sorted({*plan.remove, *old})))
    raise ExportError(
        f"GGUF export of {spec.display_name} ({spec.model_type}) cannot keep dense-MLP layers "
        f"{old} (mlp_only_layers / decoder_sparse_step): llama.cpp's {spec.gguf_arch} graph "
        "has experts in every layer",
        hint=f"remove them too (--layers {everything}), or export --to hf",
    )
