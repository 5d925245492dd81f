"""torch's thread count for one block of work, restored after (it is process-wide)."""

from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def torch_threads(threads: int):
    """Set torch's thread count to ``threads`` inside the block, then restore the
    caller's: the evaluators run inside the pipeline's own process, and the GGUF writer's
    conversion runs on one thread."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
