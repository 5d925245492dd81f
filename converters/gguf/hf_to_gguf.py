"""Pruned safetensors -> GGUF, streamed: one tensor read, converted, written, freed at a time."""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from pathlib import Path

from shortgpt_export.errors import CorruptModelError, ExportError
from shortgpt_export.pruning import plan_tensors, prune_config_dict
from shortgpt_export.safetensors_io import TensorRef, read_tensor_into
from shortgpt_export.torch_threads import torch_threads

from .metadata import add_general_metadata
from .packing import PackedStrings, pack_strings
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


def _convert(array, qtype):
    import gguf
    import numpy as np

    t = gguf.GGMLQuantizationType
    if qtype == t.F32:
        return array.astype(np.float32)
    if qtype == t.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array.astype(np.float32), qtype)


def convert_pruned(ctx, target: Path, *, out_type: str = "F16") -> None:
    """Write the pruned model of a safetensors source straight to a GGUF file."""
    import gguf
    import numpy as np

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
    writer = _fast_writer_class()(target, spec.gguf_arch)
    parameters = sum(int(np.prod(ref.shape)) for _, ref in refs)
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
    plan_types = []
    for gguf_name, ref in refs:
        qtype = _target_type(ref.shape, out_type)
        byte_shape = (
            gguf.quants.quant_shape_to_byte_shape(ref.shape, qtype)
            if qtype not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
            else ref.shape
        )
        dtype = {
            gguf.GGMLQuantizationType.F32: np.float32,
            gguf.GGMLQuantizationType.F16: np.float16,
        }.get(qtype, np.uint8)
        nbytes = int(np.prod(byte_shape)) * np.dtype(dtype).itemsize
        writer.add_tensor_info(gguf_name, byte_shape, np.dtype(dtype), nbytes, raw_dtype=qtype)
        plan_types.append(qtype)
    for gguf_name, array in extra:
        writer.add_tensor_info(gguf_name, array.shape, array.dtype, array.nbytes)

    try:
        writer.write_header_to_file()
        with _gc_paused():
            writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        fout = writer.fout[0]
        fout.flush()  # from here on the tensor data goes straight to the file descriptor
        out = _TensorOutput(fout.fileno(), fout.tell(), writer.data_alignment)
        total = sum(ref.nbytes for _, ref in refs)
        with ctx.progress(f"writing {target.name}", total) as advance:
            _write_tensors(out, refs, plan_types, spec, heads, kv_heads, advance)
            for _, array in extra:
                out.align()
                out.write(array)
            out.align()
    finally:
        writer.close()


def _fast_writer_class():
    """``gguf.GGUFWriter`` that packs long string and integer arrays in one call each.

    The token list, token types and merges are ~150k values packed one ``struct.pack``
    at a time by the library (seconds per model); the bytes written are the same.
    """
    import struct

    import gguf

    vt = gguf.GGUFValueType

    class FastGGUFWriter(gguf.GGUFWriter):
        def _pack_val(self, val, vtype, add_vtype, sub_type=None):
            if (
                vtype != vt.ARRAY
                or not isinstance(val, (list, tuple, PackedStrings))
                or len(val) < 2
            ):
                return super()._pack_val(val, vtype, add_vtype, sub_type)
            order = "<" if self.endianess == gguf.GGUFEndian.LITTLE else ">"
            strings = isinstance(val, PackedStrings) or set(map(type, val)) == {str}
            if sub_type in (None, vt.STRING) and strings:
                body, ltype = pack_strings(val, order), vt.STRING
            elif sub_type in (None, vt.INT32) and all(
                issubclass(k, int) and not issubclass(k, bool) for k in set(map(type, val))
            ):
                body = struct.pack(f"{order}{len(val)}i", *val)
                ltype = vt.INT32
            else:
                return super()._pack_val(val, vtype, add_vtype, sub_type)
            head = struct.pack(f"{order}I", vtype) if add_vtype else b""
            return head + struct.pack(f"{order}IQ", ltype, len(val)) + body

    return FastGGUFWriter


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


CHUNK_ELEMENTS = 1 << 20  # elements converted and written per step (2-4 MB buffers)


class _TensorOutput:
    """The tensor-data section of a GGUF file, appended with unbuffered ``os.write`` calls.

    Each tensor starts at a multiple of ``alignment``, zero-padded, as ``gguf.GGUFWriter``
    lays it out; ``offset`` is the absolute position in the file.
    """

    def __init__(self, fd: int, offset: int, alignment: int):
        self.fd, self.offset, self.alignment = fd, offset, alignment

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        while view:
            done = os.write(self.fd, view)
            view = view[done:]
            self.offset += done

    def align(self) -> None:
        pad = -self.offset % self.alignment
        if pad:
            self.write(bytes(pad))


class _Buffers:
    """Growable scratch buffers, one per role, reused for every chunk of every tensor."""

    def __init__(self):
        self._bufs: dict = {}

    def get(self, role: str, count: int, dtype):
        import torch

        nbytes = count * dtype.itemsize
        buf = self._bufs.get(role)
        if buf is None or buf.numel() < nbytes:
            buf = self._bufs[role] = torch.empty(nbytes, dtype=torch.uint8)
        return buf[:nbytes].view(dtype)


def _read_range(ref, first: int, view, files: dict) -> None:
    """Bytes ``first .. first + len(view)`` of ``ref``'s data into ``view``."""
    if ref.path not in files:
        files[ref.path] = open(ref.path, "rb", buffering=0)  # noqa: SIM115
    fh = files[ref.path]
    fh.seek(ref.start + first)
    done = 0
    while done < len(view):
        got = fh.readinto(view[done:])
        if not got:
            raise CorruptModelError(
                f"{ref.path} ends inside tensor {ref.name}", hint="re-download the model"
            )
        done += got


def _stream_float(ref, dtype, n_heads: int, out: _TensorOutput, files: dict, bufs: _Buffers):
    """Write one tensor converted to the float ``dtype``, a chunk at a time.

    A chunk is read into a reused buffer, converted into another and written, so the
    data stays in the CPU cache between the steps. bf16 -> f16 goes through a float32
    chunk: torch's direct cast is about half as fast, and the result is the same (bf16
    to float32 is exact). With ``n_heads``, q/k rows are reordered per head for llama.cpp's
    rope: (2, r, ..) -> (r, 2, ..); a chunk then holds whole heads.
    """
    import torch

    from shortgpt_export.safetensors_io import TORCH_DTYPES

    if ref.dtype not in TORCH_DTYPES:
        raise CorruptModelError(f"tensor {ref.name} has dtype {ref.dtype}, which cannot be read")
    src_dtype = getattr(torch, TORCH_DTYPES[ref.dtype])
    total = math.prod(ref.shape)
    unit = max(1, total // n_heads if n_heads else 1)  # elements that stay in one chunk
    step = max(1, CHUNK_ELEMENTS // unit) * unit
    widen = src_dtype != dtype and torch.float32 not in (src_dtype, dtype)
    for first in range(0, total, step):
        count = min(step, total - first)
        src = bufs.get("in", count, src_dtype)
        _read_range(
            ref, first * src_dtype.itemsize, memoryview(src.view(torch.uint8).numpy()), files
        )
        if not n_heads and src_dtype == dtype:
            out.write(src.view(torch.uint8).numpy())
            continue
        if widen:
            wide = bufs.get("f32", count, torch.float32)
            wide.copy_(src)
            src = wide
        dst = bufs.get("out", count, dtype)
        if n_heads:
            rest = ref.shape[1:]
            half = ref.shape[0] // n_heads // 2
            heads = count // unit
            dst.view(heads, half, 2, *rest).copy_(src.view(heads, 2, half, *rest).transpose(1, 2))
        else:
            dst.copy_(src)
        out.write(dst.view(torch.uint8).numpy())


def _write_tensors(out, refs, plan_types, spec, heads: int, kv_heads: int, advance) -> None:
    """Read, convert and write each tensor in chunks through buffers reused for all of them.

    Float targets are streamed by ``_stream_float``: memory stays at a few chunk buffers
    whatever the tensor size, and every byte is read once and written once with large
    unbuffered writes. Quantized targets (Q8_0) are converted whole by gguf-py. The
    conversion runs on one torch thread: it is memory-bound, and on a busy machine torch's
    thread pool cost ten times what it saved. Two other ways to use the second core were
    slower on the default model (2 shared cores, medians): writing from a background thread
    (315 ms against 287 ms for the whole export) and two threads each streaming half of
    the tensors with positioned writes (294 ms against 273 ms).
    """
    floats = _float_dtypes()
    bufs = _Buffers()
    files: dict = {}  # source files, open for the whole loop
    try:
        with torch_threads(1):
            for (gguf_name, ref), qtype in zip(refs, plan_types, strict=True):
                out.align()
                n_heads = 0
                if spec.gguf_permute_qk and gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
                    # rotate-half rows -> adjacent pairs, per head: (h, 2, r, ..) -> (h, r, 2, ..)
                    n_heads = heads if gguf_name.endswith("attn_q.weight") else kv_heads
                if qtype in floats:
                    _stream_float(ref, floats[qtype], n_heads, out, files, bufs)
                else:
                    source = read_tensor_into(ref, bytearray(ref.nbytes), files)
                    if n_heads:
                        half = ref.shape[0] // n_heads // 2
                        source = source.view(n_heads, 2, half, *ref.shape[1:]).transpose(1, 2)
                    out.write(_convert(source.float().reshape(ref.shape).numpy(), qtype))
                advance(ref.nbytes)
    finally:
        for fh in files.values():
            fh.close()


def _float_dtypes() -> dict:
    import gguf
    import torch

    t = gguf.GGMLQuantizationType
    return {t.F32: torch.float32, t.F16: torch.float16}
