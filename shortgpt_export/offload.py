"""Score a model larger than memory one decoder layer at a time (``--offload layers``).

The model is built on the meta device (no weights). The token embeddings are loaded and
every calibration window is embedded once; a recording pass (layerwise.Stack) captures the
keyword arguments (masks, rotary embeddings) the model passes to each block. Then one
block at a time gets its weights from the memory-mapped checkpoint (safetensors, or GGUF
dequantized by gguf_layers.py), runs every batch, adds to the same running sums as the
in-memory pass (scoring._LayerAccumulator), and goes back to the meta device. The block
outputs replace the inputs in one activation buffer (windows x tokens x hidden, in the
scoring dtype), which is a memory-mapped temporary file when it does not fit in memory.

Each block sees the same inputs as in the in-memory pass, so the scores are the in-memory
scores: bit for bit on the same device and dtype with the same batches. Scoring runs at
most two windows per batch (score_streamed), which changes the per-token sums only through
rounding; the other passes (healing, held-out losses) keep the caller's batches, which set
their held-out split.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from .architectures import submodule
from .calibration import CalibrationSet
from .errors import ShortGPTError
from .progress import ProgressFactory, no_progress
from .scoring import METRICS, _LayerAccumulator, check_batch_size

log = logging.getLogger(__name__)

OFFLOAD_MODES = ("auto", "none", "layers")
# the in-memory model needs its weights plus working memory; offload above this share
FIT_FRACTION = 0.8
# activations are kept in memory when they take at most this share of the free memory
ACTIVATIONS_FRACTION = 0.5
SCORING_WINDOWS_PER_PASS = 2  # score_streamed's largest batches; see scoring_windows_per_pass


class SafetensorsWeights:
    """Tensors of a safetensors folder by checkpoint name, read one at a time."""

    def __init__(self, source):
        self.refs = source.tensors()  # a multimodal checkpoint's: its text model's names

    def tensor(self, name: str, shape):
        """The tensor over a private memory map of its bytes (unmapped when it is freed):
        no heap copy, so freed layers leave no fragmented heap behind."""
        import mmap

        import torch

        from .safetensors_io import load_tensor, torch_dtype

        ref = self.refs.get(name)
        if ref is None:
            raise ShortGPTError(
                f"the checkpoint has no tensor {name!r}",
                hint="check that the model folder is complete",
            )
        dtype = torch_dtype(ref)
        if ref.nbytes < mmap.PAGESIZE:
            return load_tensor(ref)
        start = ref.start - ref.start % mmap.ALLOCATIONGRANULARITY
        with open(ref.path, "rb") as fh:
            mapped = mmap.mmap(fh.fileno(), ref.end - start, access=mmap.ACCESS_COPY, offset=start)
        count = ref.nbytes // dtype.itemsize
        flat = torch.frombuffer(mapped, dtype=dtype, count=count, offset=ref.start - start)
        return flat.view(ref.shape)

    def rows(self, name: str, ids, shape):
        """Rows ``ids`` (sorted, unique) of a 2-D tensor, read alone from the file."""
        import torch

        from .safetensors_io import TORCH_DTYPES

        ref = self.refs.get(name)
        if ref is None or len(ref.shape) != 2 or ref.dtype not in TORCH_DTYPES:
            return None
        row_bytes = ref.nbytes // ref.shape[0]
        buffer = bytearray(row_bytes * len(ids))
        view = memoryview(buffer)
        with open(ref.path, "rb") as fh:
            for i, row in enumerate(ids.tolist()):
                fh.seek(ref.start + row * row_bytes)
                fh.readinto(view[i * row_bytes : (i + 1) * row_bytes])
        dtype = getattr(torch, TORCH_DTYPES[ref.dtype])
        return torch.frombuffer(buffer, dtype=dtype).view(len(ids), ref.shape[1])

    def parameter_count(self) -> int:
        return sum(math.prod(ref.shape) for ref in self.refs.values())

    def close(self) -> None:
        self.refs = {}


def open_weights(source):
    """The per-tensor reader for a resolved source (safetensors folder or GGUF file)."""
    if source.kind == "hf":
        return SafetensorsWeights(source)
    if source.kind == "gguf":
        from .gguf_layers import GGUFWeights

        return GGUFWeights(source.path, source.spec, source.config)
    raise ShortGPTError(
        f"--offload layers reads safetensors or GGUF weights, not {source.kind} checkpoints",
        hint="convert the model to safetensors, or use --offload none",
    )


def free_memory(device: str) -> int:
    """Bytes free for tensors on ``device`` (CPU: available RAM)."""
    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    if device.startswith("mps"):
        return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
    import psutil

    return int(psutil.virtual_memory().available)


def model_bytes(source, dtype) -> int:
    """Bytes the whole model takes in memory as ``dtype``."""
    import torch

    if source.kind == "gguf":  # from the header alone: a GGUFReader takes seconds
        from .gguf_header import read_gguf_tensor_shapes

        shapes = read_gguf_tensor_shapes(source.path).values()
        count = sum(math.prod(dims) for dims in shapes)
    else:
        weights = open_weights(source)
        try:
            count = weights.parameter_count()
        finally:
            weights.close()
    return count * torch.empty((), dtype=dtype).element_size()


def choose_offload(mode: str, source, device: str, dtype) -> bool:
    """Whether to score layer by layer: ``layers`` yes, ``none`` no, ``auto`` when the
    model does not fit in ``device``'s free memory (logged)."""
    if mode not in OFFLOAD_MODES:
        raise ShortGPTError(f"unknown --offload {mode!r}", hint=f"use {', '.join(OFFLOAD_MODES)}")
    if mode != "auto":
        return mode == "layers"
    if source.kind not in ("hf", "gguf"):
        return False
    need, free = model_bytes(source, dtype), free_memory(device)
    if need > FIT_FRACTION * free:
        log.warning(
            "the model needs %.1f GB as %s but %s has %.1f GB free: scoring layer by layer "
            "(--offload layers)",
            need / 1e9,
            str(dtype).replace("torch.", ""),
            device,
            free / 1e9,
        )
        return True
    return False


def skeleton(config, dtype):
    """The causal LM of ``config`` with its parameters on the meta device (modules and
    shapes, no weights) and its computed buffers real, on the CPU: each module computes its
    own (Gemma 3's local rotary embedding its own base, Gemma's embedding scale)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def materialize(module, prefix: str, weights, device, dtype) -> None:
    """Give a meta ``module`` its weights ``prefix + name`` from the checkpoint on ``device``."""
    state = {}
    for name, meta in module.state_dict().items():
        tensor = weights.tensor(prefix + name, tuple(meta.shape))
        if tuple(tensor.shape) != tuple(meta.shape):
            raise ShortGPTError(
                f"tensor {prefix + name} has shape {tuple(tensor.shape)}, the config says "
                f"{tuple(meta.shape)}",
                hint="check that config.json matches the weights",
            )
        target = dtype if tensor.is_floating_point() else tensor.dtype
        state[name] = tensor.to(device=device, dtype=target)
    module.load_state_dict(state, assign=True, strict=True)


def release(module) -> None:
    """Move a module's weights back to the meta device (frees them)."""
    module.to("meta")


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD = 256 * 1024


def fix_mmap_threshold() -> bool:
    """Serve allocations of 256 KiB and more straight from the OS (glibc only).

    glibc raises its mmap threshold each time a large block is freed, after which large
    blocks come from the heap; a layer's activations freed and allocated again then leave
    the heap fragmented, and the peak grew with every layer (benchmarks/RESULTS.md). A
    fixed threshold keeps the peak at one layer's working set. Torch's worker threads
    allocate their pieces of a forward pass in their own malloc arenas, where freed blocks
    below the threshold stay resident. On the 4 GB benchmark model, streamed peak growth:
    batches of 4 windows, 215-216 MB with 1 MiB against 336-344 MB with 4 MiB; one window
    per pass (what scoring ran then), 180-237 MB with 1 MiB (seven runs; one window's k/v
    projections, 0.5 MB, fall below that threshold) against 181-190 MB with 256 KiB (five
    runs). The setting is process-wide and stays; returns whether it was applied."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):  # not glibc (macOS, musl)
        return False


def row_embedder(embed, name: str, weights, device, dtype):
    """Token ids -> embeddings reading only the rows the ids use, for a plain
    ``nn.Embedding`` (the vocabulary can be larger than a decoder layer); None otherwise."""
    import torch

    if type(embed) is not torch.nn.Embedding or embed.max_norm is not None:
        return None
    shape = tuple(embed.weight.shape)
    if weights.rows(name, torch.tensor([0]), shape) is None:
        return None

    def lookup(ids):
        unique, inverse = torch.unique(ids, sorted=True, return_inverse=True)
        if int(unique[0]) < 0 or int(unique[-1]) >= shape[0]:
            raise ShortGPTError(f"token id outside the vocabulary of {shape[0]}")
        rows = weights.rows(name, unique.cpu(), shape).to(device=device, dtype=dtype)
        return torch.nn.functional.embedding(inverse, rows)

    return lookup


def module_path(root, module) -> str:
    """The dotted name of ``module`` inside ``root``."""
    return next(name for name, m in root.named_modules() if m is module)


def _buffers_to(base, layers, device) -> None:
    """Modules holding only computed buffers (rotary embeddings) moved to ``device``."""
    for child in base.children():
        if child is not layers and not any(True for _ in child.parameters()):
            child.to(device)


class Activations:
    """``[windows, tokens, hidden]`` hidden states in memory or in a memory-mapped file;
    a context manager that frees them (and deletes the file) on exit."""

    def __init__(self, shape, dtype, *, spill: bool | None = None, folder: Path | None = None):
        import torch

        numel = math.prod(shape)
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if spill is None:
            spill = nbytes > ACTIVATIONS_FRACTION * free_memory("cpu")
        self.path: Path | None = None
        if spill:
            handle, name = tempfile.mkstemp(prefix="shortgpt-activations-", dir=folder)
            os.close(handle)
            self.path = Path(name)
            os.truncate(self.path, max(nbytes, 1))
            log.info("activations (%.1f GB) spill to %s", nbytes / 1e9, self.path)
            flat = torch.from_file(str(self.path), shared=True, size=numel, dtype=dtype)
            self.data = flat.view(shape)
        else:
            self.data = torch.empty(shape, dtype=dtype)

    def close(self) -> None:
        self.data = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> Activations:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LayerStream:
    """What a layer-by-layer pass over a source needs: its model on the meta device, its
    per-tensor weights, and every calibration batch recorded (block keyword arguments).

    The embeddings are computed once (reading only the rows the windows use, where the
    embedding is a plain one) and handed to ``keep_embeds(rows, embeds)``; batches are
    ``batch_size`` windows. Close it to drop the weights.
    """

    def __init__(
        self,
        source,
        calib: CalibrationSet,
        *,
        device: str,
        dtype,
        batch_size: int,
        keep_embeds,
        progress: ProgressFactory = no_progress,
    ):
        import torch

        from .layerwise import Stack

        check_batch_size(batch_size)
        fix_mmap_threshold()
        self.spec, self.dtype, self.dev = source.spec, dtype, torch.device(device)
        self.model = model = skeleton(source.config, dtype)
        base = getattr(model, model.base_model_prefix, model)
        self.layers = layers = self.spec.decoder_layers(model)
        embed = model.get_input_embeddings()
        head = model.get_output_embeddings()
        # a tied LM head reads the embedding matrix (the meta skeleton may not tie them)
        self.tied = head is not None and (
            head.weight is embed.weight or bool(getattr(model.config, "tie_word_embeddings", 0))
        )
        self.size = size = batch_size
        self.weights = open_weights(source)
        try:
            self.embed_name = module_path(model, embed) + ".weight"
            lookup = row_embedder(embed, self.embed_name, self.weights, self.dev, dtype)
            if lookup is None:
                materialize(embed, self.embed_name[: -len("weight")], self.weights, self.dev, dtype)
            _buffers_to(base, layers, self.dev)
            self.recorder = Stack(model, self.spec, device=self.dev)
            self.batches = []
            with torch.inference_mode(), progress("embedding calibration windows", None):
                for index, batch in enumerate(self.recorder.record_batches(calib, size, lookup)):
                    keep_embeds(self.rows(index, batch), batch.embeds)
                    batch.embeds = None
                    self.batches.append(batch)
            if lookup is None:
                release(embed)
        except BaseException:
            self.close()
            raise

    def rows(self, index: int, batch=None) -> slice:
        """The calibration windows of batch ``index``."""
        batch = self.batches[index] if batch is None else batch
        return slice(index * self.size, index * self.size + batch.input_ids.shape[0])

    @contextmanager
    def layer(self, index: int, down_weight=None):
        """Decoder layer ``index`` with its weights, released (back to meta) after;
        ``down_weight``: a healed MLP down projection used instead of the checkpoint's."""
        layer = self.layers[index]
        materialize(layer, f"{self.spec.layers_path}.{index}.", self.weights, self.dev, self.dtype)
        if down_weight is not None:
            linear = submodule(layer, self.spec.down_proj_path)
            linear.weight.data = down_weight.to(device=self.dev, dtype=linear.weight.dtype)
        try:
            yield layer
        finally:
            release(layer)

    def load_output(self) -> None:
        """Give the final norm and the LM head their weights (kept until closed); a head
        tied to the embeddings reads the embedding matrix."""
        stack = self.recorder
        for module in (stack.norm, stack.head):
            prefix = module_path(self.model, module) + "."
            weights = self.weights
            if module is stack.head and self.tied:
                weights = _Renamed(self.weights, {prefix + "weight": self.embed_name})
            materialize(module, prefix, weights, self.dev, self.dtype)

    def close(self) -> None:
        self.weights.close()


class _Renamed:
    """A weights reader under other names (a tied LM head reads the embeddings)."""

    def __init__(self, weights, names: dict[str, str]):
        self.weights, self.names = weights, names

    def tensor(self, name: str, shape):
        return self.weights.tensor(self.names.get(name, name), shape)


def stream_scores(
    source,
    calib: CalibrationSet,
    *,
    device: str = "cpu",
    dtype=None,
    metric: str = "bi",
    batch_size: int = 4,
    blocks: bool = False,
    spill: bool | None = None,
    spill_dir: Path | None = None,
    progress: ProgressFactory = no_progress,
):
    """:func:`scoring.score_layers`, one decoder layer in memory at a time (one pass).

    ``spill`` forces (True) or forbids (False) the memory-mapped activation file; None
    decides from the free memory. With ``blocks``, every layer's unit-normalized inputs
    are kept too (in a spilled file under the same rule) for the block distances.
    """
    import torch

    if metric not in METRICS:
        raise ShortGPTError(f"unknown metric {metric!r}", hint=f"use one of: {', '.join(METRICS)}")
    dtype = dtype or torch.float32
    n_layers = source.num_layers
    windows, seq = calib.input_ids.shape
    hidden = int(source.config.hidden_size)
    with ExitStack() as stack:
        states = stack.enter_context(
            Activations((windows, seq, hidden), dtype, spill=spill, folder=spill_dir)
        )
        units = None
        if blocks:
            units = stack.enter_context(
                Activations((n_layers, windows, seq, hidden), torch.float32, spill=spill,
                            folder=spill_dir)
            )  # fmt: skip

        def keep_embeds(rows, embeds):
            states.data[rows] = embeds.cpu()

        stream = LayerStream(
            source,
            calib,
            device=device,
            dtype=dtype,
            batch_size=batch_size,
            keep_embeds=keep_embeds,
            progress=progress,
        )
        stack.callback(stream.close)
        dev, recorder = stream.dev, stream.recorder
        n_layers = len(stream.layers)
        acc = _LayerAccumulator(n_layers, metric, blocks=blocks)
        with torch.inference_mode(), progress("scoring layers", n_layers) as advance:
            for index in range(n_layers):
                with stream.layer(index) as layer:
                    for b, batch in enumerate(stream.batches):
                        rows = stream.rows(b)
                        x = states.data[rows].to(dev)
                        out = recorder.run(index, x, batch)
                        acc.mask = batch.mask
                        if blocks:
                            acc._units = {
                                s: units.data[s, rows].to(dev)[batch.mask] for s in range(index)
                            }
                        acc.pre_hook(index)(layer, (x,), {})
                        acc.post_hook(index)(layer, (), {}, out)
                        if blocks:
                            # stored unmasked; rows of padding are never read back
                            full = torch.zeros(x.shape, dtype=torch.float32, device=dev)
                            full[batch.mask] = acc._units[index]
                            units.data[index, rows] = full.cpu()
                        states.data[rows] = out.cpu()
                advance(1)
        acc._units = {}
    return (acc.scores(), acc.block_distances()) if blocks else acc.scores()


def load_tokenizer(source, trust_remote_code: bool = False):
    """The tokenizer of a source, without its weights."""
    from .errors import CorruptModelError

    try:
        if source.kind == "gguf":
            from .gguf_tokenizer import tokenizer_from_gguf

            tokenizer = tokenizer_from_gguf(source.path)
            if hasattr(tokenizer, "vocab_file"):
                tokenizer.vocab_file = None
            return tokenizer
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    except ShortGPTError:
        raise
    except Exception as exc:
        raise CorruptModelError(
            f"cannot load the tokenizer of {source.ref}: {type(exc).__name__}: {exc}"[:300],
            hint="check that the tokenizer files are complete",
        ) from exc


@dataclass
class StreamedModel:
    """A source scored layer by layer: its tokenizer, no weights in memory (``model`` None)."""

    source: object  # ModelSource
    tokenizer: object
    device: str
    dtype: object
    model: None = None


@contextmanager
def pruned_pass(streamed: StreamedModel, calib, keep, patches, batch_size: int, progress):
    """Run ``calib`` through the layers ``keep`` (healed down projections ``patches`` by
    original layer merged as each loads), one decoder layer in memory at a time; yields
    ``(stream, states)`` with the final norm and LM head loaded and ``states.data`` the
    pruned model's last hidden states."""
    import torch

    dtype = streamed.dtype or torch.float32
    hidden = int(streamed.source.config.hidden_size)
    with ExitStack() as stack:
        states = stack.enter_context(Activations((*calib.input_ids.shape, hidden), dtype))
        stream = LayerStream(
            streamed.source, calib, device=streamed.device, dtype=dtype, batch_size=batch_size,
            keep_embeds=lambda rows, embeds: states.data.__setitem__(rows, embeds.cpu()),
            progress=progress,
        )  # fmt: skip
        stack.callback(stream.close)
        blocks = stream.recorder
        rows = [stream.rows(b) for b in range(len(stream.batches))]
        with progress("pruned model, layer by layer", len(keep)) as advance:
            for index in keep:
                # the patch is merged as the layer loads, before inference mode
                with stream.layer(index, (patches or {}).get(index)), torch.inference_mode():
                    for b, batch in enumerate(stream.batches):
                        x = states.data[rows[b]].to(stream.dev)
                        states.data[rows[b]] = blocks.run(index, x, batch).cpu()
                advance(1)
        stream.load_output()
        yield stream, states


def stream_logprobs(
    streamed: StreamedModel,
    keep: list[int],
    windows,
    patches: dict | None = None,
    *,
    batch_size: int = 4,
    progress: ProgressFactory = no_progress,
):
    """[n_windows * len, vocab] float64 next-token log-probabilities of the pruned model
    (the layers ``keep``, with the healed down projections ``patches`` by original layer
    merged), one decoder layer in memory at a time: the reference that export
    verification compares a GGUF or ONNX file with, without the whole model."""
    import torch

    from .calibration import CalibrationSet

    ids = torch.as_tensor(windows, dtype=torch.long)
    calib = CalibrationSet(ids, torch.ones_like(ids), "verification windows", ids.shape[1])
    out = []
    with (
        pruned_pass(streamed, calib, keep, patches, batch_size, progress) as (stream, states),
        torch.inference_mode(),
    ):
        blocks = stream.recorder
        for b in range(len(stream.batches)):
            x = states.data[stream.rows(b)].to(stream.dev)
            logits = blocks.logits(x).cpu()
            out.append(torch.log_softmax(logits.double(), dim=-1).flatten(0, 1))
    return torch.cat(out)


def stream_mean_loss(
    streamed: StreamedModel,
    calib,
    keep: list[int],
    patches: dict | None = None,
    *,
    batch_size: int = 4,
    progress: ProgressFactory = no_progress,
) -> float:
    """The pruned model's mean next-token loss over the real tokens of ``calib`` (summed
    per batch of ``batch_size`` windows by layerwise.Stack.loss_sums, as the in-memory
    passes do), one decoder layer in memory at a time."""
    import torch

    from .layerwise import mean_loss

    with (
        pruned_pass(streamed, calib, keep, patches, batch_size, progress) as (stream, states),
        torch.inference_mode(),
    ):
        finals = (states.data[stream.rows(b)].to(stream.dev) for b in range(len(stream.batches)))
        return mean_loss(stream.recorder, finals, stream.batches)


def scoring_windows_per_pass(batch_size: int) -> int:
    """Calibration windows per forward pass of layer-by-layer scoring: ``batch_size``, at
    most ``SCORING_WINDOWS_PER_PASS``.

    Beside one layer and the activations, a pass's intermediates are most of the memory,
    and they grow with the windows per pass; fewer windows per pass cost time, since each
    pass reads the layer's weights again. On the 4 GB benchmark model (float32, 4 windows
    of 256 tokens, benchmarks/bench_offload.py), peak growth over one layer plus the
    activations and time against the in-memory run: one window 1.29x and 1.31x, time 1.32x
    (two runs); two windows 1.43x and 1.38x, time 1.10x and 1.22x (two runs); four
    windows 1.49-1.52x (probe runs).
    """
    check_batch_size(batch_size)
    return min(batch_size, SCORING_WINDOWS_PER_PASS)


def score_streamed(
    streamed: StreamedModel,
    calib: CalibrationSet,
    *,
    metric: str = "bi",
    batch_size: int = 4,
    blocks: bool = False,
    progress: ProgressFactory = no_progress,
):
    """:func:`scoring.score_model` for a :class:`StreamedModel`, one layer at a time.

    Each layer runs :func:`scoring_windows_per_pass` windows per forward pass: the BI and
    angular sums are per token, so the grouping changes the scores only through rounding.
    """
    from .scoring import timed_scores

    windows = scoring_windows_per_pass(batch_size)
    return timed_scores(
        lambda: stream_scores(
            streamed.source,
            calib,
            device=streamed.device,
            dtype=streamed.dtype,
            metric=metric,
            batch_size=windows,
            blocks=blocks,
            progress=progress,
        ),
        source=streamed.source,
        calib=calib,
        device=streamed.device,
        metric=metric,
        blocks=blocks,
    )
