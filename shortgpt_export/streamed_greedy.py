"""Greedy selection (selection.greedy_steps) with one decoder layer in memory at a time.

For ``--offload layers``: the model stays on the meta device (offload.LayerStream). One
step tries every candidate in ONE pass over the kept layers. Candidate ``c`` has a branch:
the hidden state entering ``c``, then run through the kept layers after ``c``. At each kept
layer the weights are loaded once; every batch of the stale cached states and of every
branch whose candidate comes before the layer runs through it; the layer is released. The
final norm and LM head, loaded once and kept, give each branch's loss at the end.

The states entering each kept layer are cached between steps, as in memory: removing the
j-th kept layer keeps the states before it valid and the next step's pass recomputes the
rest; kept layers before both the first stale state and the first candidate are not
loaded. With healing in the loop (``heal``), candidate j's patch is fitted at the kept
layer before it (with that layer's original down projection) against the original model's
state entering the kept layer after j, and its branch starts from the patched output.

Passes over the layers: one per removal (the first also fills the cache); with ``heal``,
one more before the first, for the original model's states (the fits' targets).
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

from .calibration import CalibrationSet
from .healing import apply_patch, check_healable, down_proj, patched_weight
from .layerwise import mean_loss
from .offload import Activations, LayerStream
from .selection import GreedyStep, _shortlist, fit_patch, greedy_steps

log = logging.getLogger(__name__)


def streamed_greedy_steps(
    streamed,
    calib: CalibrationSet,
    *,
    spill: bool | None = None,
    spill_dir: Path | None = None,
    **options,
) -> Iterator[GreedyStep]:
    """:func:`selection.greedy_steps` for an ``offload.StreamedModel`` (source, device,
    dtype): the same removals and losses, one decoder layer in memory at a time. Each
    removal is one pass over the kept layers (with healing in the loop, one pass more
    before the first), each needed layer loaded once per pass.

    ``options`` are greedy_steps' keyword options (heal, ridge, weighting, batch_size,
    scores, max_candidates, progress), with its defaults. ``spill`` / ``spill_dir`` as for
    :func:`offload.stream_scores`: the cached states, the branches and (heal) the targets
    each take up to ``(layers + 1) x windows x tokens x hidden``, in memory-mapped files
    when they do not fit.
    """
    import torch

    source = streamed.source
    bound = inspect.signature(greedy_steps).bind(None, source.spec, calib, **options)
    bound.apply_defaults()
    o = bound.arguments
    heal, scores, max_candidates, progress = (
        o[k] for k in ("heal", "scores", "max_candidates", "progress")
    )
    if heal:
        check_healable(source.spec, "linear")
    dtype = streamed.dtype or torch.float32
    n = source.num_layers
    shape = (*calib.input_ids.shape, int(source.config.hidden_size))
    with ExitStack() as stack:

        def buffer(count: int):
            new = Activations((count, *shape), dtype, spill=spill, folder=spill_dir)
            return stack.enter_context(new).data

        states = buffer(n + 1)  # states[slots[q]]: the state entering the q-th kept layer

        def keep_embeds(rows, embeds):
            states[0, rows] = embeds.cpu()

        stream = LayerStream(
            source,
            calib,
            device=streamed.device,
            dtype=dtype,
            batch_size=o["batch_size"],
            keep_embeds=keep_embeds,
            progress=progress,
        )
        stack.callback(stream.close)
        stream.load_output()
        wide = n if scores is None or max_candidates is None else min(n, max_candidates)
        branches = buffer(max(wide, 1))
        search = _Search(stream, states, branches, (o["ridge"], o["weighting"]), progress)
        keep, slots, valid = list(range(n)), list(range(n + 1)), 1
        if heal:
            with torch.inference_mode():
                search.run(
                    keep, slots, valid, [], "greedy: original hidden states (layer by layer)"
                )
                search.targets = buffer(n + 1)
                search.targets.copy_(states)  # slots are the layer indices still
            valid = n + 1
        step = 0
        while len(keep) > 1:
            step += 1
            began = time.perf_counter()
            tried = _shortlist(keep, scores, max_candidates)
            with torch.inference_mode():
                results = search.run(
                    keep,
                    slots,
                    valid,
                    tried,
                    f"greedy: removal {step} ({len(tried)} candidates, layer by layer)",
                )
            best = min(range(len(tried)), key=lambda k: (results[k][0], k))
            loss, patch = results[best]
            j = tried[best]
            layer = keep.pop(j)
            del slots[j + 1]
            valid = j + 1  # states entering keep[:j + 1] still hold
            if patch is not None:
                search.patches[keep[j - 1]] = patch
                valid = j
            seconds = time.perf_counter() - began
            log.info(
                "greedy step %d (layer by layer): removed layer %d, loss %.4f, %.1f s",
                step,
                layer,
                loss,
                seconds,
            )
            yield GreedyStep(layer=layer, loss=loss, seconds=seconds)


class _Search:
    """The buffers of a streamed greedy search and its one pass over the kept layers."""

    def __init__(self, stream: LayerStream, states, branches, fitting: tuple, progress):
        self.stream, self.states, self.branches = stream, states, branches
        self.progress = progress
        self.ridge, self.weighting = fitting
        self.targets = None  # the original model's state entering each layer (heal)
        self.patches: dict[int, object] = {}  # layer -> its patch T (float64)

    def run(self, keep, slots, valid, tried, title):
        """One pass: recompute the cached states from kept position ``valid - 1`` on, and
        run the branch of every candidate position in ``tried``; returns (loss, patch or
        None) per candidate, as ``selection._candidate``."""
        stream, states, branches = self.stream, self.states, self.branches
        last = len(keep) - 1
        where = {k: states[slots[j]] for k, j in enumerate(tried)}  # branch k's state now
        patches: dict[int, object] = {}
        with self.progress(title, len(keep)) as advance:
            for q, index in enumerate(keep):
                refresh = q + 1 >= valid
                running = [k for k, j in enumerate(tried) if j < q]
                fits = [] if self.targets is None else [
                    k for k, j in enumerate(tried) if j == q + 1 and 0 < j < last
                ]  # fmt: skip
                if refresh or running or fits:
                    with stream.layer(index):
                        for k in fits:
                            patches[k] = self._fit(index, states[slots[q]], keep[q + 2], k)
                            where[k] = branches[k]
                        if index in self.patches:
                            weight = down_proj(stream.recorder, index).weight
                            weight.data.copy_(patched_weight(weight.detach(), self.patches[index]))
                        for b in range(len(stream.batches)):
                            rows = stream.rows(b)
                            if refresh:
                                states[slots[q + 1], rows] = self._step(index, states[slots[q]], b)
                            for k in running:
                                branches[k, rows] = self._step(index, where[k], b)
                    for k in running:
                        where[k] = branches[k]
                advance(1)
        return [(self._loss(where[k]), patches.get(k)) for k in range(len(tried))]

    def _step(self, index: int, source, b: int):
        stream = self.stream
        hidden = source[stream.rows(b)].to(stream.dev)
        return stream.recorder.run(index, hidden, stream.batches[b]).cpu()

    def _fit(self, p: int, entering, target: int, k: int):
        """Fit the patch of layer ``p`` (loaded, unpatched) for the run ending before layer
        ``target``; branch ``k`` gets the patched output. Returns the patch (float64)."""
        stream = self.stream
        dev, rows = stream.dev, [stream.rows(b) for b in range(len(stream.batches))]
        t, parts = fit_patch(
            stream.recorder,
            p,
            (entering[r].to(dev) for r in rows),
            stream.batches,
            (self.targets[target, r].to(dev) for r in rows),
            self.ridge,
            self.weighting,
        )
        for r, (res, m) in zip(rows, parts, strict=True):
            self.branches[k, r] = (res + apply_patch(m, t)).cpu()
        return t.double()

    def _loss(self, final) -> float:
        stream = self.stream
        hidden = (final[stream.rows(b)].to(stream.dev) for b in range(len(stream.batches)))
        return mean_loss(stream.recorder, hidden, stream.batches)
