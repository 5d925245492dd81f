"""The tensor-data section of a GGUF file, streamed: each tensor read, converted and written
a chunk at a time, the writing on a thread of its own so that the next chunk is read and
converted while the last one is written."""

from __future__ import annotations

import logging
import math
import os
import queue
import threading

from shortgpt_export.safetensors_io import read_range, read_tensor_into, torch_dtype, write_all
from shortgpt_export.torch_threads import torch_threads

CHUNK_ELEMENTS = 1 << 20  # elements converted and written per step (2-4 MB buffers)
PIPELINE_DEPTH = 3  # chunks converted ahead of the writer: 3 x 4 MB at most

log = logging.getLogger(__name__)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class TensorOutput:
    """Appends to a file descriptor at absolute position ``offset``: each tensor starts at a
    multiple of ``alignment``, zero-padded, as ``gguf.GGUFWriter`` lays it out.

    Chunks go into buffers handed out by :meth:`buffer` and are written in the order they
    are :meth:`submit`-ted. With ``pipelined``, a writer thread does the ``os.write`` calls
    (which, like torch's casts, release the GIL) while the caller fills the next buffer;
    at most ``depth`` buffers are in flight. Without it, each submit writes at once into
    one reused buffer. Used as a context manager, it waits for the last write on exit and
    raises the first write error (unless the block is already raising).
    """

    def __init__(self, fd: int, offset: int, alignment: int, *, pipelined: bool, depth=None):
        import torch

        self.fd, self.offset, self.alignment = fd, offset, alignment
        depth = (depth or PIPELINE_DEPTH) if pipelined else 1
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(depth):
            self._free.put(torch.empty(0, dtype=torch.uint8))
        self._error: BaseException | None = None
        self._pending: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = None
        if pipelined:
            self._thread = threading.Thread(target=self._drain, name="gguf-writer", daemon=True)
            self._thread.start()

    def buffer(self, nbytes: int):
        """A byte buffer of ``nbytes`` (a torch uint8 tensor) to fill and :meth:`submit`;
        waits while every buffer is still being written."""
        import torch

        base = self._free.get()
        self._raise_error()
        if base.numel() < nbytes:
            base = torch.empty(nbytes, dtype=torch.uint8)
        view = base[:nbytes]
        view._gguf_base = base  # handed back to the pool once written
        return view

    def submit(self, data) -> None:
        """Write ``data`` (a buffer from :meth:`buffer`, or any bytes-like object) next."""
        base = getattr(data, "_gguf_base", None)
        raw = memoryview(data.numpy() if base is not None else data).cast("B")
        self.offset += raw.nbytes
        if self._thread is None:
            try:
                write_all(self.fd, raw)
            finally:
                if base is not None:
                    self._free.put(base)
            return
        self._raise_error()
        self._pending.put((raw, base))

    def align(self) -> None:
        pad = -self.offset % self.alignment
        if pad:
            self.submit(bytes(pad))

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback) -> None:
        interrupt = None
        if self._thread is not None:
            self._pending.put(None)
            while self._thread.is_alive():  # the caller closes the file next
                try:
                    self._thread.join()
                except BaseException as exc:  # Ctrl-C while waiting: wait on, raise it after
                    interrupt = interrupt or exc
            self._thread = None
        if interrupt is not None:
            raise interrupt
        if kind is None:
            self._raise_error()
        elif self._error is not None:
            log.warning("the GGUF writer failed as well: %s", self._error)

    def _drain(self) -> None:
        while (item := self._pending.get()) is not None:
            view, base = item
            if self._error is None:  # after a failure the rest is dropped, buffers freed
                try:
                    write_all(self.fd, view)
                except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread
                    self._error = exc
            if base is not None:
                self._free.put(base)

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error


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


def stream_float(ref, dtype, n_heads: int, out: TensorOutput, files: dict, bufs: _Buffers):
    """Write one tensor converted to the float ``dtype``, a chunk at a time.

    A chunk is read into a reused buffer and converted into an output buffer, so the data
    stays in the CPU cache between the steps. bf16 -> f16 goes through a float32 chunk:
    torch's direct cast is about half as fast, and the result is the same (bf16 to float32
    is exact). With ``n_heads``, q/k rows are reordered per head for llama.cpp's rope:
    (2, r, ..) -> (r, 2, ..); a chunk then holds whole heads.
    """
    import torch

    src_dtype = torch_dtype(ref)
    total = math.prod(ref.shape)
    unit = max(1, total // n_heads if n_heads else 1)  # elements that stay in one chunk
    step = max(1, CHUNK_ELEMENTS // unit) * unit
    widen = src_dtype != dtype and torch.float32 not in (src_dtype, dtype)
    for first in range(0, total, step):
        count = min(step, total - first)
        if not n_heads and src_dtype == dtype:  # the bytes as they are
            raw = out.buffer(count * src_dtype.itemsize)
            read_range(ref, first * src_dtype.itemsize, memoryview(raw.numpy()), files)
            out.submit(raw)
            continue
        src = bufs.get("in", count, src_dtype)
        read_range(
            ref, first * src_dtype.itemsize, memoryview(src.view(torch.uint8).numpy()), files
        )
        if widen:
            wide = bufs.get("f32", count, torch.float32)
            wide.copy_(src)
            src = wide
        raw = out.buffer(count * dtype.itemsize)
        dst = raw.view(dtype)
        if n_heads:
            rest = ref.shape[1:]
            half = ref.shape[0] // n_heads // 2
            heads = count // unit
            dst.view(heads, half, 2, *rest).copy_(src.view(heads, 2, half, *rest).transpose(1, 2))
        else:
            dst.copy_(src)
        out.submit(raw)


def write_tensors(out: TensorOutput, tensors, advance) -> None:
    """Read, convert and write ``tensors`` in order, each at the next aligned offset:
    ``(ref, target, heads)`` with ``target`` a torch float dtype or a function from the
    whole tensor (q/k rows already reordered for ``heads``) to the bytes to write.

    Float targets are streamed by :func:`stream_float`: memory stays at a few chunk buffers
    whatever the tensor size, and every byte is read once and written once with large
    unbuffered writes. Other targets (gguf-py's quantizers) are read whole. The conversion
    runs on one torch thread: it is memory-bound, and on a busy machine torch's thread pool
    cost ten times what it saved; the second core, where there is one, does the writes
    (``out``).
    The caller aligns and writes whatever follows, then leaves ``out``'s block.
    """
    import torch

    bufs = _Buffers()
    files: dict = {}  # source files, open for the whole loop
    try:
        with torch_threads(1):
            for ref, target, n_heads in tensors:
                out.align()
                if isinstance(target, torch.dtype):
                    stream_float(ref, target, n_heads, out, files, bufs)
                else:
                    source = read_tensor_into(ref, bytearray(ref.nbytes), files)
                    if n_heads:
                        half = ref.shape[0] // n_heads // 2
                        source = source.view(n_heads, 2, half, *ref.shape[1:]).transpose(1, 2)
                    out.submit(target(source.reshape(ref.shape)))
                advance(ref.nbytes)
    finally:
        for fh in files.values():
            fh.close()
