"""Linear healing one decoder layer in memory at a time (``--offload layers``).

The same heal as :func:`healing.heal_linear` (guarded, front to back, each run fitted
against the original model's hidden states), on the meta skeleton of offload.py: every
calibration window is embedded once (offload.LayerStream), and each pass below loads one
layer's weights from the checkpoint, runs every batch (and every guard branch) through
it, and frees it before the next. Hidden states live in offload.Activations buffers (in
memory, or memory-mapped files when they do not fit); the fits keep only Gram sums.

Passes, with ``position`` the first kept layer the pruned model changes:

1. original states: layers ``0..last`` (``last``: the end of the last healable run) once;
   all windows up to ``position`` (the pruned model's state there), then the fitting
   windows on, keeping the original output of each run's last layer as its target.
2. per healable run ``[a..b]`` (``p = a - 1``), a fitting pass: the kept layers from
   ``position`` to ``p`` (earlier patches merged), with the Gram sums at ``p``;
3. and a guard pass: the kept layers after ``p``, then the final norm and LM head, on the
   held-out windows, carrying one branch per candidate patch (plus the unpatched model
   for the first run); none with ``guard=False``.

So ``1 + 2 x runs`` passes (``runs``: the removed runs with a kept layer before them and
one after); a layer is loaded at most ``1 + runs`` times in all (in the first pass, then
per run in its fitting or its guard pass); the final norm and LM head are loaded at the
first guard pass and kept.

4. ``--heal refit`` (:func:`_refit`): one more pass from ``position`` on, carrying the
   original model's states (every layer, checkpoint weights) beside the refitted model's
   (the kept layers, run patches and earlier refits merged); each kept layer is fitted to
   the original state entering the next kept layer, as :func:`healing._refit_kept` does.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

from . import offload
from .architectures import submodule
from .calibration import CalibrationSet
from .healing import (
    DEFAULT_RIDGE,
    DEFAULT_WEIGHTING,
    GramFit,
    HealResult,
    _warn_if_few_tokens,
    apply_patch,
    check_heal_options,
    choose_refit,
    down_proj,
    guard_batch_size,
    guard_split,
    judge_patch,
    merged_weight,
    mlp_parts,
    patched_weight,
    refit_record,
    runs_to_heal,
    skip_unguarded,
    solve_candidates,
)
from .layerwise import mean_loss
from .planning import Plan
from .progress import ProgressFactory, no_progress
from .recipe import subset
from .selection import (
    block_heal_options,
    block_held_out,
    closest_blocks,
    healed_block_choice,
    try_blocks,
)

log = logging.getLogger(__name__)


class _Passes:
    """The state of one streamed heal: the stream, which batches fit or are held out, the
    pruned model's hidden states and the patches made so far."""

    def __init__(self, stream, states, group_size: int, guard: bool, result: HealResult, new):
        self.stream, self.states, self.result, self.new = stream, states, result, new
        self.window_shape = tuple(states.data.shape[1:])  # [tokens, hidden]
        self.stack = stream.recorder
        count = len(stream.batches)
        groups = math.ceil(states.data.shape[0] / group_size)
        held = guard_split(groups)[1] if guard else []
        # heal_linear's batch g is the run of our (smaller) batches with b * size // G == g
        group = [b * stream.size // group_size for b in range(count)]
        self.held_groups = held
        self.fit = [b for b in range(count) if group[b] not in set(held)]
        self.held = [b for b in range(count) if group[b] in set(held)]
        self.fit_rows = self._compact(self.fit)
        self.held_rows = self._compact(self.held)
        self.output_loaded = False

    def _compact(self, batches: list[int]) -> dict[int, slice]:
        """Rows of ``batches`` in a buffer that holds only their windows."""
        rows, start = {}, 0
        for b in batches:
            size = self.stream.batches[b].input_ids.shape[0]
            rows[b] = slice(start, start + size)
            start += size
        return rows

    def buffer(self, count: int, *lead: int):
        """A ``[*lead, count, tokens, hidden]`` Activations buffer (freed with the heal)."""
        return self.new((*lead, count, *self.window_shape))

    @contextmanager
    def loaded(self, index: int):
        """Layer ``index`` in memory, with its patch merged if it has one."""
        with self.stream.layer(index, self.result.weights.get(index)) as layer:
            yield layer

    def run(self, index: int, buffer, rows: slice, b: int) -> None:
        """Block ``index`` on batch ``b``'s rows of ``buffer``, in place."""
        x = buffer[rows].to(self.stream.dev)
        buffer[rows] = self.stack.run(index, x, self.stream.batches[b]).cpu()

    def original(self, position: int, todo: list, progress):
        """Pass 1: the pruned model's state entering keep[position] (all windows, in
        ``self.states``), and the original output of each run's last layer (fitting
        windows) as ``targets[run]``."""
        stream = self.stream
        last = max(b for _, b in todo)
        ends = {b: i for i, (_, b) in enumerate(todo)}
        fit_count = sum(s.stop - s.start for s in self.fit_rows.values())
        work = self.buffer(fit_count)
        targets = self.buffer(fit_count, len(todo))
        with progress("healing layer by layer: original hidden states", last + 1) as advance:
            for index in range(last + 1):
                if index == position:
                    for b in self.fit:
                        work.data[self.fit_rows[b]] = self.states.data[stream.rows(b)]
                with self.loaded(index):
                    if index < position:
                        for b in range(len(stream.batches)):
                            self.run(index, self.states.data, stream.rows(b), b)
                    else:
                        for b in self.fit:
                            self.run(index, work.data, self.fit_rows[b], b)
                            if index in ends:
                                targets.data[ends[index], self.fit_rows[b]] = work.data[
                                    self.fit_rows[b]
                                ]
                advance(1)
        work.close()
        return targets

    def prefix(self, position: int, progress) -> None:
        """Every window through layers ``0..position - 1`` (none is patched), in place."""
        with progress("healing layer by layer: original hidden states", position) as advance:
            for index in range(position):
                with self.loaded(index):
                    for b in range(len(self.stream.batches)):
                        self.run(index, self.states.data, self.stream.rows(b), b)
                advance(1)

    def fit_run(self, layers: list[int], p: int, target, fits: dict, parts) -> object:
        """Pass 2: ``layers`` on every window, then layer ``p``'s MLP output and residual:
        Gram sums on the fitting windows, (r, m) kept for the held-out ones. Returns p's
        down projection weight before any patch."""
        stream = self.stream
        for index in layers:
            with self.loaded(index):
                for b in range(len(stream.batches)):
                    self.run(index, self.states.data, stream.rows(b), b)
        with self.loaded(p):
            original = down_proj(self.stack, p).weight.detach().clone()
            for b, batch in enumerate(stream.batches):
                x = self.states.data[stream.rows(b)].to(stream.dev)
                out, m = mlp_parts(self.stack, p, x, batch)
                if b in self.fit_rows:
                    y = target[self.fit_rows[b]].to(stream.dev)[batch.mask]
                    mask = batch.mask
                    for w, fit in fits.items():
                        fit.add(m[mask].cpu(), (out - m)[mask].cpu(), y.cpu(), w)
                else:
                    parts.data[0, self.held_rows[b]] = (out - m).cpu()
                    parts.data[1, self.held_rows[b]] = m.cpu()
        return original

    def held_losses(self, layers: list[int], parts, patches: list) -> list[float]:
        """Pass 3: the held-out loss of each branch ``r + m T`` (``T`` None: ``r + m``)
        through ``layers``, the final norm and the LM head."""
        stream = self.stream
        branches = self.buffer(parts.data.shape[1], len(patches))
        for j, t in enumerate(patches):
            for b in self.held:
                r = parts.data[0, self.held_rows[b]].to(stream.dev)
                m = parts.data[1, self.held_rows[b]].to(stream.dev)
                h = r + m if t is None else r + apply_patch(m, t)
                branches.data[j, self.held_rows[b]] = h.cpu()
        for index in layers:
            with self.loaded(index):
                for j in range(len(patches)):
                    for b in self.held:
                        self.run(index, branches.data[j], self.held_rows[b], b)
        if not self.output_loaded:  # the final norm and LM head, kept until the heal ends
            self.stream.load_output()
            self.output_loaded = True
        held = [stream.batches[b] for b in self.held]
        losses = [
            mean_loss(
                self.stack,
                (branches.data[j, self.held_rows[b]].to(stream.dev) for b in self.held),
                held,
            )
            for j in range(len(patches))
        ]
        branches.close()
        return losses


def stream_heal_linear(
    source,
    calib: CalibrationSet,
    remove: list[int],
    *,
    device: str = "cpu",
    dtype=None,
    ridge: float | None = DEFAULT_RIDGE,
    weighting: str | None = DEFAULT_WEIGHTING,
    guard: bool = True,
    refit: bool = False,
    batch_size: int = 4,
    spill: bool | None = None,
    spill_dir: Path | None = None,
    progress: ProgressFactory = no_progress,
) -> HealResult:
    """:func:`healing.heal_linear` for a source read one layer at a time.

    The batches and held-out windows are heal_linear's (every 4th batch), so the patches,
    refits and losses equal the in-memory heal's to rounding. ``spill`` / ``spill_dir``:
    the hidden-state buffers' memory-mapped files, as in offload.stream_scores."""
    import torch

    tries = check_heal_options(source.spec, ridge, weighting, guard, refit)
    began = time.perf_counter()
    n = source.num_layers
    keep = [i for i in range(n) if i not in set(remove)]
    result = HealResult(ridge=ridge, weighting=weighting, guard=guard, refit=refit)
    todo = runs_to_heal(remove, n, result)
    if not todo and not refit:
        return result
    dtype = dtype or torch.float32
    size = guard_batch_size(batch_size, calib.input_ids.shape[0]) if guard else batch_size
    with ExitStack() as closing:

        def new(shape):
            return closing.enter_context(
                offload.Activations(shape, dtype, spill=spill, folder=spill_dir)
            )

        states = new((*calib.input_ids.shape, int(source.config.hidden_size)))
        stream = offload.LayerStream(
            source, calib, device=device, dtype=dtype, batch_size=size, progress=progress,
            keep_embeds=lambda rows, embeds: states.data.__setitem__(rows, embeds.cpu()),
        )  # fmt: skip
        closing.callback(stream.close)
        passes = _Passes(stream, states, size, guard, result, new)
        if guard and not passes.held_groups:
            return skip_unguarded(todo, result)
        batches = stream.batches
        result.held_out_tokens = sum(batches[b].tokens for b in passes.held)
        _warn_if_few_tokens(sum(batches[b].tokens for b in passes.fit), passes.stack)
        hidden = states.data.shape[-1]
        with torch.inference_mode():
            position = cut = max(min(remove) - 1, 0)
            targets = None
            if todo:
                targets = passes.original(position, todo, progress)
            else:  # a refit alone: the state entering ``cut``, all windows
                passes.prefix(cut, progress)
            start = None
            if refit:  # the original model's state entering ``cut``
                start = new(states.data.shape)
                start.data.copy_(states.data)
            held_windows = sum(s.stop - s.start for s in passes.held_rows.values())
            parts = passes.buffer(held_windows, 2) if held_windows and todo else None
            unhealed_loss = None
            with progress("healing layer by layer: fitting patches", len(todo)) as advance:
                for i, (a, b) in enumerate(todo):
                    p = a - 1
                    stop = keep.index(p)
                    fits = {w: GramFit(hidden) for w in {w for w, _ in tries}}
                    original = passes.fit_run(keep[position:stop], p, targets.data[i], fits, parts)
                    position = stop
                    solved = solve_candidates(fits, tries, guard)
                    losses = None
                    if guard:
                        first = [None] if unhealed_loss is None else []
                        losses = passes.held_losses(keep[stop + 1 :], parts, first + solved)
                        if first:
                            unhealed_loss, losses = losses[0], losses[1:]
                    entry, t, loss = judge_patch((a, b), fits, tries, solved, losses, unhealed_loss)
                    result.tokens = fits[entry["weighting"]].tokens
                    if t is not None:
                        result.weights[p] = merged_weight(passes.stack, p, original, t)
                        if guard:
                            unhealed_loss = loss
                    result.runs.append(entry)
                    advance(1)
            if refit:
                for done in (states, parts, targets):  # the run passes' buffers
                    if done is not None:
                        done.close()
                result.refit = _refit(passes, keep, cut, start, tries, unhealed_loss, progress)
    result.weights = {p: w.clone() for p, w in result.weights.items()}
    result.runs.sort(key=lambda entry: entry["run"][0])
    result.seconds = time.perf_counter() - began
    return result


def heal_streamed(streamed, calib: CalibrationSet, remove: list[int], **options) -> HealResult:
    """:func:`stream_heal_linear` for an offload.StreamedModel (the recipe's heal step);
    ``options``: its ridge, weighting, guard, refit, batch_size and progress."""
    log.info("healing layer by layer (--offload layers): one decoder layer in memory at a time")
    return stream_heal_linear(
        streamed.source, calib, remove, device=streamed.device, dtype=streamed.dtype, **options
    )


def _refit(passes: _Passes, keep, first: int, start, tries, baseline, progress) -> dict:
    """:func:`healing._refit_kept` in one layer-by-layer pass from ``first`` (``start``: the
    original state entering it, all windows); kept refits go into ``passes.result.weights``.

    ``orig`` runs every layer with the checkpoint's weights (the fit targets), ``cur`` the
    kept layers with the run patches and the refits so far, and, when ``baseline`` is not
    known, ``base`` the held-out windows through the run-patched model alone."""
    stream, stack, weights = passes.stream, passes.stack, passes.result.weights
    n, count = len(stream.layers), len(stream.batches)
    rows = [stream.rows(b) for b in range(count)]
    held = set(passes.held)
    orig, cur = start, passes.new(start.data.shape)
    cur.data.copy_(start.data)
    outs, mlps = passes.new(start.data.shape), passes.new(start.data.shape)
    base = None  # the held-out windows only, at passes.held_rows
    if baseline is None:
        base = passes.buffer(sum(r.stop - r.start for r in passes.held_rows.values()))
        for b in passes.held:
            base.data[passes.held_rows[b]] = start.data[rows[b]]
    refits, layers = {}, []
    hidden = start.data.shape[-1]

    def original_through(indices) -> None:  # removed layers: the original model only
        for index in indices:
            with stream.layer(index):
                for b in range(count):
                    passes.run(index, orig.data, rows[b], b)

    with progress("healing layer by layer: refitting kept layers", len(keep) - first) as advance:
        # ``start`` enters layer ``first``, ``cur`` the pruned model's keep[first] (later
        # when the cut starts at layer 0)
        original_through(range(first, keep[first]))
        for idx in range(first, len(keep)):
            q = keep[idx]
            target = keep[idx + 1] if idx + 1 < len(keep) else n
            with stream.layer(q) as layer:  # the checkpoint's weights: the original model
                for b in range(count):
                    passes.run(q, orig.data, rows[b], b)
                linear = submodule(layer, stream.spec.down_proj_path)
                before = weights.get(q)
                if before is None:
                    before = linear.weight.detach().clone()
                linear.weight.data = before.to(device=stream.dev, dtype=linear.weight.dtype)
                for b in range(count):
                    if base is not None and b in held:
                        passes.run(q, base.data, passes.held_rows[b], b)
                    x = cur.data[rows[b]].to(stream.dev)
                    out, m = mlp_parts(stack, q, x, stream.batches[b])
                    outs.data[rows[b]], mlps.data[rows[b]] = out.cpu(), m.cpu()
            original_through(range(q + 1, target))
            fits = {w: GramFit(hidden) for w in {w for w, _ in tries}}
            check = GramFit(hidden)  # held-out, unweighted
            for b, batch in enumerate(stream.batches):
                mask = batch.mask.cpu()
                m, out = mlps.data[rows[b]][mask], outs.data[rows[b]][mask]
                y = orig.data[rows[b]][mask]
                if b in held:
                    check.add(m, out - m, y, "none")
                else:
                    for w, fit in fits.items():
                        fit.add(m, out - m, y, w)
            entry, t = choose_refit(q, fits, check, tries)
            layers.append(entry)
            if t is None:
                cur.data.copy_(outs.data)
            else:
                refits[q] = patched_weight(before, t)
                for b in range(count):
                    m = mlps.data[rows[b]]
                    cur.data[rows[b]] = outs.data[rows[b]] - m + apply_patch(m, t)
            advance(1)
    if not passes.output_loaded:
        stream.load_output()
        passes.output_loaded = True
    held_batches = [stream.batches[b] for b in passes.held]

    def held_loss(buffer, at) -> float:
        return mean_loss(stack, (buffer.data[at[b]].to(stream.dev) for b in passes.held),
                         held_batches)  # fmt: skip

    if base is not None:
        baseline = held_loss(base, passes.held_rows)
    record = refit_record(baseline, held_loss(cur, rows), layers)
    if record["kept"]:
        weights.update(refits)
    return record


def healed_block_streamed(
    streamed,
    calib: CalibrationSet,
    distances: list[list[float]],
    n: int,
    scores: list[float] | None = None,
    *,
    candidates: int,
    heal_options: dict | None = None,
    batch_size: int = 4,
    progress: ProgressFactory = no_progress,
) -> tuple[Plan, HealResult]:
    """:func:`selection.healed_block_plan` for an offload.StreamedModel: each of the
    ``candidates`` closest blocks healed layer by layer, then its pruned, healed model run
    layer by layer on the heal guard's held-out windows; the lowest loss wins."""
    num_layers = streamed.source.num_layers
    options = block_heal_options(n, num_layers, heal_options)
    rows = calib.input_ids.shape[0]
    size = guard_batch_size(batch_size, rows)
    held = block_held_out(math.ceil(rows / size), rows)
    # the held-out batches are runs of whole batches (a short one only last), so
    # streaming their windows in batches of ``size`` batches them as heal_linear does
    windows = subset(calib, [w for k in held for w in range(k * size, min((k + 1) * size, rows))])
    starts = closest_blocks(distances, n, candidates)

    def heal_and_judge(remove: list[int], keep: list[int]):
        heal = heal_streamed(
            streamed, calib, remove, batch_size=batch_size, progress=progress, **options
        )
        return heal, offload.stream_mean_loss(
            streamed, windows, keep, heal.weights, batch_size=size, progress=progress
        )

    tried = try_blocks(starts, n, num_layers, heal_and_judge, progress)
    return healed_block_choice(num_layers, distances, n, tried, scores)


__all__ = ["heal_streamed", "healed_block_streamed", "stream_heal_linear"]
