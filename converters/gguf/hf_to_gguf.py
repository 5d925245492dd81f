"""Pruned safetensors -> GGUF, streamed: one tensor read, converted, written, freed at a time."""

from __future__ import annotations

import math
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from shortgpt_export.errors import ExportError
from shortgpt_export.pruning import plan_tensors, prune_config_dict
from shortgpt_export.safetensors_io import TensorRef

from .metadata import add_general_metadata
from .packing import fast_writer_class
from .tensor_stream import TensorOutput, usable_cpus, write_tensors
from .tokenizer import add_tokenizer

# F32/F16 are the bases the GGUF back-end writes; Q8_0 (gguf-py's own quantizer) lets tests
# build a quantized GGUF source without llama.cpp.
OUT_TYPES = ("F32", "F16", "Q8_0")
SKIP_SUFFIXES = ("rotary_emb.inv_freq",)


def _model_arch(name: str):
    import gguf

    for arch, arch_name in gguf.MODEL_ARCH_NAMES.items():
        if arch_name == name:
            return arch
    raise ExportError(f"gguf does not know architecture {name!r}")


def _add_hparams(writer, config: dict) -> None:
    import gguf

    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config.get("rope_theta", 10000.0))
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config["vocab_size"])
    scaling = config.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
    elif kind != "llama3":  # llama3 scaling travels as the rope_freqs tensor
        raise ExportError(
            f"rope scaling {kind!r} is not supported by the built-in GGUF converter",
            hint="set LLAMA_CPP_DIR and pass --converter llama.cpp",
        )


def llama3_rope_factors(config: dict):
    """Per-frequency divisors that reproduce Llama 3's rope scaling (``rope_freqs.weight``)."""
    import numpy as np

    s = config["rope_scaling"]
    heads = config["num_attention_heads"]
    dim = config.get("head_dim") or config["hidden_size"] // heads
    base = config.get("rope_theta", 10000.0)
    freqs = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    old_ctx = s["original_max_position_embeddings"]
    low, high, factor = s["low_freq_factor"], s["high_freq_factor"], s["factor"]
    wavelen = 2 * np.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    factors = 1.0 / ((1 - smooth) / factor + smooth)
    factors = np.where(wavelen < old_ctx / high, 1.0, factors)
    factors = np.where(wavelen > old_ctx / low, factor, factors)
    return factors.astype(np.float32)


class BlockNameMap:
    """gguf's tensor names, looked up in a one-block ``TensorNameMap``.

    gguf-py builds its map by walking every tensor table once per block (17 ms for 30
    layers, more for deeper models); a layer's tensor is looked up as layer 0 and its
    ``blk.0.`` renumbered. Names that do not resolve that way go to the full map.
    """

    SUFFIXES = (".weight", ".bias")

    def __init__(self, arch, n_blocks: int, spec):
        import gguf

        self.arch, self.n_blocks, self.spec = arch, n_blocks, spec
        self.one = gguf.get_tensor_name_map(arch, 1)
        self._full = None

    def get_name(self, name: str) -> str | None:
        layer = self.spec.layer_of(name)
        if layer is None:
            found = self.one.get_name(name, try_suffixes=self.SUFFIXES)
        elif layer < self.n_blocks:
            found = self.one.get_name(self.spec.renumber(name, 0), try_suffixes=self.SUFFIXES)
            found = f"blk.{layer}.{found[6:]}" if found and found.startswith("blk.0.") else None
        else:
            found = None
        return found if found is not None else self.full().get_name(name, self.SUFFIXES)

    def full(self):
        import gguf

        if self._full is None:
            self._full = gguf.get_tensor_name_map(self.arch, self.n_blocks)
        return self._full


def _target_type(shape: tuple[int, ...], out_type: str):
    import gguf

    t = gguf.GGMLQuantizationType
    if len(shape) == 1:
        return t.F32
    if out_type == "Q8_0" and shape[-1] % 32 != 0:
        return t.F16
    return getattr(t, out_type)


def _quantized(tensor, qtype):
    """A whole tensor quantized by gguf-py (Q8_0), as bytes to write."""
    import gguf

    return gguf.quants.quantize(tensor.float().numpy(), qtype)


def convert_pruned(ctx, target: Path, *, out_type: str = "F16") -> None:
    """Write the pruned model of a safetensors source straight to a GGUF file."""
    import gguf
    import numpy as np
    import torch

    if out_type not in OUT_TYPES:
        raise ExportError(f"the built-in converter writes {', '.join(OUT_TYPES)}, not {out_type}")
    source, plan, spec = ctx.source, ctx.plan, ctx.source.spec
    folder = source.path
    config = prune_config_dict(source.config_dict(), spec, plan.keep)
    arch = _model_arch(spec.gguf_arch)
    name_map = BlockNameMap(arch, config["num_hidden_layers"], spec)
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads

    refs: list[tuple[str, TensorRef | None]] = []
    for ref in plan_tensors(source.tensors(plan.patch_path()), spec, plan):
        if ref.name.endswith(SKIP_SUFFIXES):
            continue
        gguf_name = name_map.get_name(ref.name)
        if gguf_name is None:
            raise ExportError(f"no GGUF name for tensor {ref.name} ({spec.gguf_arch})")
        refs.append((gguf_name, ref))

    embedding = next((ref for name, ref in refs if name == "token_embd.weight"), None)
    if embedding is not None and embedding.shape[0] != config["vocab_size"]:
        # the tokenizer arrays are sized from vocab_size: it must be the embedding's rows
        raise ExportError(
            f"config vocab_size {config['vocab_size']} does not match the "
            f"{embedding.shape[0]} rows of the token embedding",
            hint="fix vocab_size in config.json",
        )
    writer = fast_writer_class()(target, spec.gguf_arch)
    parameters = sum(math.prod(ref.shape) for _, ref in refs)
    add_general_metadata(writer, folder, source.name, parameters)
    _add_hparams(writer, config)
    writer.add_file_type(
        getattr(gguf.LlamaFileType, f"MOSTLY_{out_type}", gguf.LlamaFileType.ALL_F32)
    )
    with _gc_paused():  # tokenizer.json's ~100k small objects; see _gc_paused
        add_tokenizer(writer, folder, config["vocab_size"])
    extra = []
    if (config.get("rope_scaling") or {}).get("rope_type") == "llama3":
        extra.append(("rope_freqs.weight", llama3_rope_factors(config)))
    floats = {gguf.GGMLQuantizationType.F32: (np.float32, torch.float32),
              gguf.GGMLQuantizationType.F16: (np.float16, torch.float16)}  # fmt: skip
    tensors = []  # (ref, float dtype streamed or the whole tensor's quantizer, q/k heads)
    for gguf_name, ref in refs:
        qtype = _target_type(ref.shape, out_type)
        if qtype in floats:
            dtype, convert = floats[qtype]
            byte_shape = ref.shape
        else:
            dtype, convert = np.uint8, partial(_quantized, qtype=qtype)
            byte_shape = gguf.quants.quant_shape_to_byte_shape(ref.shape, qtype)
        nbytes = math.prod(byte_shape) * np.dtype(dtype).itemsize
        writer.add_tensor_info(gguf_name, byte_shape, np.dtype(dtype), nbytes, raw_dtype=qtype)
        tensors.append((ref, convert, _qk_heads(spec, gguf_name, heads, kv_heads)))
    for gguf_name, array in extra:
        writer.add_tensor_info(gguf_name, array.shape, array.dtype, array.nbytes)

    try:
        writer.write_header_to_file()
        with _gc_paused():
            writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        fout = writer.fout[0]
        fout.flush()  # from here on the tensor data goes straight to the file descriptor
        total = sum(ref.nbytes for _, ref in refs)
        with (
            ctx.progress(f"writing {target.name}", total) as advance,
            TensorOutput(
                fout.fileno(), fout.tell(), writer.data_alignment, pipelined=usable_cpus() > 1
            ) as out,
        ):
            write_tensors(out, tensors, advance)
            for _, array in extra:
                out.align()
                out.submit(array)
            out.align()
    finally:
        writer.close()


def _qk_heads(spec, gguf_name: str, heads: int, kv_heads: int) -> int:
    """Heads whose rows are reordered for llama.cpp's rope (q and k of families that need
    it: rotate-half rows -> adjacent pairs, per head), else 0."""
    if not spec.gguf_permute_qk:
        return 0
    if gguf_name.endswith("attn_q.weight"):
        return heads
    return kv_heads if gguf_name.endswith("attn_k.weight") else 0


@contextmanager
def _gc_paused():
    """No cyclic garbage collection for a bounded phase that allocates many small objects.

    Parsing tokenizer.json and packing its 100k strings would otherwise trigger full
    collections that walk the whole heap (torch and transformers are loaded). On the busy
    2-core machine the default model's export took a median 2.0 s with collection on
    against 1.4 s with it off (3 runs each; noisy).
    """
    import gc

    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
