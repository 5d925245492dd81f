"""Run a decoder stack one block at a time, from cached inputs.

Greedy selection and healing re-run parts of the stack many times. The keyword arguments
a model passes to its decoder blocks (masks, rotary embeddings, positions) do not depend
on which blocks run, so they are recorded once per batch by a cheap pass in which every
block is replaced by a recorder; after that any sequence of blocks can be applied to any
hidden state, and the final norm and LM head give the next-token loss.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass

from .architectures import ArchitectureSpec, submodule
from .calibration import CalibrationSet


class _Stop(Exception):
    pass


@dataclass
class Batch:
    """One batch of calibration windows with what its decoder blocks are called with."""

    input_ids: object  # [b, seq]
    mask: object  # [b, seq] bool, real tokens
    embeds: object  # [b, seq, hidden], the input to block 0
    kwargs: list[dict]  # per block of the full model

    @property
    def tokens(self) -> int:
        return int(self.mask.sum())


class _Recorded(tuple):
    """A recorder's output: the block input, passed on to the next recorder."""


def _block_output(output):
    return output[0] if isinstance(output, tuple) else output


class Stack:
    """A model's decoder blocks, callable one by one on recorded batches."""

    def __init__(self, model, spec: ArchitectureSpec, device=None):
        self.model = model
        self.spec = spec
        self.layers = spec.decoder_layers(model)
        self.norm = submodule(model, spec.final_norm_path)
        self.head = model.get_output_embeddings()
        # a model built on the meta device (offload.py) runs its embeddings on ``device``
        self.device = device if device is not None else next(model.parameters()).device

    def record(self, calib: CalibrationSet, batch_size: int) -> list[Batch]:
        """Embeddings and per-block keyword arguments of every batch of ``calib``."""
        return list(self.record_batches(calib, batch_size))

    def record_batches(self, calib: CalibrationSet, batch_size: int, embed=None) -> Iterator[Batch]:
        """:meth:`record`, one batch at a time (the caller may move each batch's embeds).

        ``embed`` (token ids -> embeddings) replaces the model's own embedding module."""
        import torch

        container_path, _, attr = self.spec.layers_path.rpartition(".")
        container = submodule(self.model, container_path)
        base = getattr(self.model, self.model.base_model_prefix, self.model)
        seen: dict[int, tuple] = {}

        class Recorder(torch.nn.Module):
            def __init__(self, index: int, last: bool):
                super().__init__()
                self.index, self.last = index, last
                # attributes some model code reads from its blocks
                self.attention_type = getattr(original[index], "attention_type", None)

            def forward(self, *args, **kwargs):
                hidden = args[0] if args else kwargs.pop("hidden_states")
                if isinstance(hidden, _Recorded):
                    hidden = hidden[0]
                seen[self.index] = (hidden if self.index == 0 else None, dict(kwargs))
                if self.last:
                    raise _Stop
                # A tuple passes either way a model loop reads block outputs: Llama's
                # `h = block(h)` hands it to the next recorder (unwrapped above), Gemma 3's
                # `h = block(h)[0]` takes the tensor, RWKV's `h, state, _ = block(h)` its
                # extra outputs (ArchitectureSpec.block_extra_outputs).
                extra = tuple(kwargs.get(k) if k else None for k in extras)
                return _Recorded((hidden, *extra))

        original = self.layers
        n = len(original)
        extras = self.spec.block_extra_outputs
        setattr(container, attr, torch.nn.ModuleList(Recorder(i, i == n - 1) for i in range(n)))
        try:
            with torch.inference_mode():
                for start in range(0, calib.input_ids.shape[0], batch_size):
                    ids = calib.input_ids[start : start + batch_size].to(self.device)
                    mask = calib.attention_mask[start : start + batch_size].to(self.device)
                    seen.clear()
                    inputs = {"input_ids": ids} if embed is None else {"inputs_embeds": embed(ids)}
                    with suppress(_Stop):
                        base(**inputs, attention_mask=mask, use_cache=False)
                    yield Batch(ids, mask.bool(), seen[0][0], [seen[i][1] for i in range(n)])
        finally:
            setattr(container, attr, original)

    def run(self, index: int, hidden, batch: Batch):
        """Apply block ``index`` (of the full model) to ``hidden``."""
        return _block_output(self.layers[index](hidden, **batch.kwargs[index]))

    def run_many(self, indices, hidden, batch: Batch):
        for index in indices:
            hidden = self.run(index, hidden, batch)
        return hidden

    def logits(self, hidden):
        """The model's logits from the last block's output: the final norm, the LM head and
        the family's logit transforms (ArchitectureSpec.logit_transforms)."""
        return self.spec.output_logits(self.model.config, self.head(self.norm(hidden)))

    def loss_sums(self, hidden, batch: Batch) -> tuple[float, int]:
        """Summed next-token negative log-likelihood over real tokens, and their count."""
        import torch

        logits = self.logits(hidden)[:, :-1].float()
        target = batch.input_ids[:, 1:]
        valid = batch.mask[:, 1:] & batch.mask[:, :-1]
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none"
        ).view(target.shape)
        return float(nll[valid].double().sum()), int(valid.sum())


def mean_loss(stack: Stack, states: list, batches: list[Batch]) -> float:
    """Mean next-token loss from final hidden states ``states`` (one per batch)."""
    total, count = 0.0, 0
    for hidden, batch in zip(states, batches, strict=True):
        s, c = stack.loss_sums(hidden, batch)
        total, count = total + s, count + c
    return total / max(count, 1)
