"""The torch rows of a validation run for a model scored layer by layer (``--offload
layers``, offload.StreamedModel): perplexity and agreement from one pass over the
decoder layers, one in memory at a time. Latency and the QA check are not measured:
generating would stream every layer once per token, which says nothing about the model's
speed in memory."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import numpy as np

from ..progress import ProgressFactory, no_progress
from .evaluators import Evaluator, torch_threads
from .measure import provenance, quality

NOT_MEASURED = {
    "prompt_tok_s": None,
    "gen_tok_s": None,
    "ttft_s": None,
    "peak_rss_bytes": None,
    "rss_growth_bytes": None,
}


class LayerwiseEvaluator(Evaluator):
    """Log-probabilities of the windows given at construction, from one layer-by-layer
    pass of the layers ``keep`` (with the healed down projections ``patches``); the final
    hidden states are kept, the LM head runs per window on request."""

    backend = "torch"

    def __init__(
        self,
        streamed,
        keep: list[int],
        windows: np.ndarray,
        patches: dict | None = None,
        *,
        threads: int = 1,
        batch_size: int = 1,  # one window per forward pass, as the in-memory rows run them
        progress: ProgressFactory = no_progress,
    ):
        import torch

        from ..calibration import CalibrationSet
        from ..offload import pruned_pass

        super().__init__(Path("(layer by layer)"), threads, streamed.device)
        self.version = f"torch {torch.__version__}, one layer at a time"
        ids = torch.as_tensor(np.asarray(windows), dtype=torch.long)
        calib = CalibrationSet(ids, torch.ones_like(ids), "evaluation windows", ids.shape[1])
        self._index = {_key(w): i for i, w in enumerate(ids.numpy())}
        self.keep = list(keep)
        self.dtype = streamed.dtype or torch.float32
        with ExitStack() as closing:  # kept open until close() unless this raises
            with torch_threads(threads):
                self._stream, self._states = closing.enter_context(
                    pruned_pass(streamed, calib, keep, patches, batch_size, progress)
                )
            self._closing = closing.pop_all()

    def logprobs(self, window):
        import torch

        index = self._index[_key(window)]
        with torch.inference_mode(), torch_threads(self.threads):
            hidden = self._states.data[index : index + 1].to(self._stream.dev)
            logits = self._stream.recorder.logits(hidden)[0].cpu()
        return torch.log_softmax(logits.double(), dim=-1)

    def parameter_bytes(self) -> int:
        """Bytes of the evaluated model's parameters in its dtype (the removed layers left
        out, a tied LM head once), as session.parameter_bytes counts a model in memory."""
        stream = self._stream
        kept = set(self.keep)
        left_out = [layer for i, layer in enumerate(stream.layers) if i not in kept]
        if stream.tied:
            left_out.append(stream.recorder.head)
        skip = {id(p) for module in left_out for p in module.parameters()}
        return sum(
            p.numel() * p.element_size() for p in stream.model.parameters() if id(p) not in skip
        )

    def close(self) -> None:
        self._closing.close()


def _key(window) -> bytes:
    return np.asarray(window, dtype=np.int64).tobytes()


def layerwise_record(evaluator: LayerwiseEvaluator, evaluation) -> dict:
    """torch_record's fields for a layer-by-layer evaluator: latency and memory not
    measured, no QA."""
    reference = np.load(evaluation.reference_path, mmap_mode="r")
    opts = evaluation.opts
    return {
        **quality(evaluator, evaluation.windows, reference, opts.kl_windows),
        **NOT_MEASURED,
        **provenance(evaluator),
        "accelerators": [],
        "layer_by_layer": True,
    }
