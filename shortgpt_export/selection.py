"""Which layers to remove: by score (ShortGPT), greedily by loss (SLEB), or as a block.

- ``score``: the N lowest by ``--metric`` (planning.make_plan).
- ``greedy``: remove one layer at a time, each time the one whose removal gives the lowest
  next-token loss on the calibration windows of the model as it stands (Song et al. 2024,
  SLEB). The hidden states entering each block are cached, so a candidate costs only the
  blocks after it; with healing in the loop, a candidate's loss is measured after fitting
  the patch its removal would get (healing.py).
- ``block``: the contiguous run of N layers whose input and output are closest in angular
  distance (Gromov et al. 2024), from the scoring pass's block distances. With healing, the
  few closest blocks are each healed and the one with the lowest next-token loss on the
  held-out calibration windows is removed: the distance says how much a block changes the
  hidden state, the loss after patching how much of that change a patch cannot restore.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

from .architectures import ArchitectureSpec
from .calibration import CalibrationSet
from .errors import PlanError
from .healing import (
    DEFAULT_RIDGE,
    DEFAULT_WEIGHTING,
    GramFit,
    HealResult,
    apply_patch,
    check_healable,
    down_proj,
    guard_batch_size,
    guard_split,
    heal_linear,
    mlp_parts,
    patched_loss,
    patched_weight,
    record_original_states,
)
from .layerwise import Batch, Stack
from .planning import Plan
from .progress import ProgressFactory, no_progress

log = logging.getLogger(__name__)

STRATEGIES = ("score", "greedy", "block")
BLOCK_CANDIDATES = 4  # closest blocks healed and compared by held-out loss (benchmarks)


def check_strategy(name: str) -> None:
    if name not in STRATEGIES:
        raise PlanError(f"unknown --select {name!r}", hint=f"use one of: {', '.join(STRATEGIES)}")


def block_choice(distances: list[list[float]], n: int) -> tuple[int, float]:
    """(first layer, distance) of the closest block of ``n`` layers."""
    start = closest_blocks(distances, n, 1)[0]
    return start, distances[n - 1][start]


def block_plan(
    num_layers: int, distances: list[list[float]], n: int, scores: list[float] | None = None
) -> Plan:
    """Remove the ``n`` contiguous layers whose input and output are closest."""
    if not 0 <= n < num_layers:
        raise PlanError(f"cannot remove a block of {n} of {num_layers} layers")
    remove: list[int] = []
    selection: dict = {"block_distances": distances[n - 1] if n else []}
    if n:
        start, distance = block_choice(distances, n)
        remove = list(range(start, start + n))
        selection.update(start=start, distance=distance)
    return Plan.removing(
        num_layers,
        remove,
        metric="angular",
        reason=f"remove the block of {n} layers with the smallest input-output angular distance",
        scores=scores,
        strategy="block",
        selection=selection,
    )


def closest_blocks(distances: list[list[float]], n: int, k: int) -> list[int]:
    """First layers of the ``k`` blocks of ``n`` layers with the smallest distance."""
    row = distances[n - 1]
    return sorted(range(len(row)), key=lambda s: (row[s], s))[:k]


def block_heal_options(n: int, num_layers: int, heal_options: dict | None) -> dict:
    """The heal options of a block choice (guarded), after checking the request."""
    if not 0 < n < num_layers:
        raise PlanError(f"cannot remove a block of {n} of {num_layers} layers")
    options = {"guard": True} | (heal_options or {})
    if not options["guard"]:
        raise PlanError("choosing a block by held-out loss needs the heal guard's windows")
    return options


def block_held_out(batches: int, rows: int) -> list[int]:
    """The held-out batches that judge the healed blocks (the heal guard's)."""
    held = guard_split(batches)[1]
    if not held:
        raise PlanError(
            f"choosing a block by held-out loss needs at least 2 calibration windows, got {rows}",
            hint="pass more --calib-tokens or a shorter --seq-len",
        )
    return held


def healed_block_plan(
    model,
    spec: ArchitectureSpec,
    calib: CalibrationSet,
    distances: list[list[float]],
    n: int,
    scores: list[float] | None = None,
    *,
    candidates: int = BLOCK_CANDIDATES,
    heal_options: dict | None = None,
    batch_size: int = 4,
    batches: list[Batch] | None = None,
    original_states: list | None = None,
    progress: ProgressFactory = no_progress,
) -> tuple[Plan, HealResult]:
    """Of the ``candidates`` closest blocks of ``n`` layers, heal each (guarded
    :func:`healing.heal_linear`) and keep the one whose pruned, healed model has the lowest
    next-token loss on the guard's held-out calibration windows.

    ``batches`` and ``original_states`` (every block's input) may be passed in, as to
    :func:`healing.heal_linear`, when several plans are made on one model."""
    import torch

    num_layers = len(spec.decoder_layers(model))
    options = block_heal_options(n, num_layers, heal_options)
    stack = Stack(model, spec)
    starts = closest_blocks(distances, n, candidates)
    rows = calib.input_ids.shape[0]
    with torch.inference_mode():
        if batches is None:
            batches = stack.record(calib, guard_batch_size(batch_size, rows))
        states = original_states
        if states is None:
            # per candidate: the state entering it, entering the layer before it, and the
            # original output of its last layer (the patch's target); all for a refit
            needed = {i for s in starts for i in (max(s - 1, 0), s, s + n)}
            if options.get("refit"):
                needed = None
            states = record_original_states(stack, batches, progress, needed)
    held = block_held_out(len(batches), rows)

    def heal_and_judge(remove: list[int], keep: list[int]):
        heal = heal_linear(
            model, spec, calib, remove, batches=batches, original_states=states, **options
        )
        return heal, patched_loss(stack, batches, states, keep, heal.weights, held)

    tried = try_blocks(starts, n, num_layers, heal_and_judge, progress)
    return healed_block_choice(num_layers, distances, n, tried, scores)


def try_blocks(starts: list[int], n: int, num_layers: int, heal_and_judge, progress) -> list:
    """``(held-out loss, first layer, heal)`` of each candidate block of ``n`` layers;
    ``heal_and_judge(remove, keep)`` heals one and returns ``(heal, loss)``."""
    tried = []
    with progress(f"block: healing the {len(starts)} closest blocks", len(starts)) as advance:
        for start in starts:
            remove = list(range(start, start + n))
            keep = [i for i in range(num_layers) if i not in set(remove)]
            heal, loss = heal_and_judge(remove, keep)
            log.info("block %d..%d: held-out loss %.4f after healing", start, start + n - 1, loss)
            tried.append((loss, start, heal))
            advance(1)
    return tried


def healed_block_choice(
    num_layers: int,
    distances: list[list[float]],
    n: int,
    tried: list[tuple[float, int, HealResult]],
    scores: list[float] | None = None,
) -> tuple[Plan, HealResult]:
    """The plan removing the block of ``tried`` ``(held-out loss, first layer, heal)`` with
    the lowest loss (ties: the earliest), and its heal."""
    loss, start, heal = min(tried, key=lambda t: (t[0], t[1]))
    row = distances[n - 1]
    plan = Plan.removing(
        num_layers,
        list(range(start, start + n)),
        metric="angular",
        reason=(
            f"remove the block of {n} layers that, of the {len(tried)} with the smallest "
            "input-output angular distance, has the lowest held-out loss after healing"
        ),
        scores=scores,
        strategy="block",
        selection={
            "block_distances": row,
            "start": start,
            "distance": row[start],
            "chosen_by": "held-out next-token loss after healing",
            "candidates": [
                {"start": s, "distance": row[s], "held_out_loss": round(c, 6)}
                for c, s, _ in sorted(tried, key=lambda t: t[1])
            ],
        },
    )
    return plan, heal


@dataclass
class GreedyStep:
    layer: int  # original index of the layer removed at this step
    loss: float  # calibration next-token loss after removing it
    seconds: float


def greedy_plan(
    num_layers: int,
    steps: list[GreedyStep],
    scores: list[float] | None,
    heal: bool,
    shortlist: int | None = None,
) -> Plan:
    """The plan of the first ``len(steps)`` greedy removals."""
    remove = sorted(s.layer for s in steps)
    how = " with a linear patch fitted for each candidate" if heal else ""
    return Plan.removing(
        num_layers,
        remove,
        metric="loss",
        reason=f"remove {len(steps)} layers greedily by calibration loss{how} (SLEB)",
        scores=scores,
        strategy="greedy",
        selection={
            "heal_in_loop": heal,
            "shortlist": shortlist,  # None: every kept layer was tried at each step
            "steps": [
                {"layer": s.layer, "loss": round(s.loss, 6), "seconds": round(s.seconds, 3)}
                for s in steps
            ],
        },
    )


def greedy_steps(
    model,
    spec: ArchitectureSpec,
    calib: CalibrationSet,
    *,
    heal: bool = False,
    ridge: float = DEFAULT_RIDGE,
    weighting: str = DEFAULT_WEIGHTING,
    batch_size: int = 4,
    scores: list[float] | None = None,
    max_candidates: int | None = None,
    progress: ProgressFactory = no_progress,
) -> Iterator[GreedyStep]:
    """Greedy removals one at a time (take as many as wanted); ``model`` is restored after.

    With ``scores`` and ``max_candidates``, each step tries only the ``max_candidates``
    kept layers with the lowest scores (BI rank), which bounds a step's cost.

    ``states[j]`` holds, per batch, the hidden state entering the j-th kept block (the
    last entry: the final output); removing block j leaves ``states[:j+1]`` valid.
    """
    import torch

    if heal:
        check_healable(spec, "linear")
    stack = Stack(model, spec)
    n = len(stack.layers)
    originals: dict[int, object] = {}
    try:
        with torch.inference_mode():
            batches = stack.record(calib, batch_size)
            keep = list(range(n))
            states = [[b.embeds for b in batches]]
            with progress("greedy: caching hidden states", n) as advance:
                for index in range(n):
                    states.append(
                        [stack.run(index, h, b) for h, b in zip(states[-1], batches, strict=True)]
                    )
                    advance(1)
        # the original model's state entering each block, the targets of healing
        targets = [list(s) for s in states] if heal else None
        step = 0
        while len(keep) > 1:
            step += 1
            began = time.perf_counter()
            with torch.inference_mode():
                fitting = (targets, originals, ridge, weighting)
                tried = _shortlist(keep, scores, max_candidates)
                layer, loss = _remove_best(
                    stack, batches, keep, states, fitting, step, progress, tried
                )
                # the caller sees the unpatched model between steps
                patched = {p: down_proj(stack, p).weight.detach().clone() for p in originals}
                for p, weight in originals.items():
                    down_proj(stack, p).weight.data.copy_(weight)
            seconds = time.perf_counter() - began
            log.info(
                "greedy step %d: removed layer %d, loss %.4f, %.1f s", step, layer, loss, seconds
            )
            yield GreedyStep(layer=layer, loss=loss, seconds=seconds)
            with torch.inference_mode():
                for p, weight in patched.items():
                    down_proj(stack, p).weight.data.copy_(weight)
    finally:
        for p, weight in originals.items():
            down_proj(stack, p).weight.data.copy_(weight)


def _shortlist(keep: list[int], scores, max_candidates: int | None) -> list[int]:
    """Positions in ``keep`` to try: all, or the ``max_candidates`` lowest-scored."""
    positions = list(range(len(keep)))
    if scores is None or max_candidates is None or max_candidates >= len(keep):
        return positions
    ranked = sorted(positions, key=lambda j: (scores[keep[j]], j))
    return sorted(ranked[:max_candidates])


def _remove_best(stack, batches, keep, states, fitting, step, progress, tried=None):
    """Remove the candidate with the lowest loss from ``keep``; update ``states`` in place."""
    originals = fitting[1]
    best: tuple[float, int, object] | None = None
    tried = list(range(len(keep))) if tried is None else tried
    with progress(f"greedy: removal {step} ({len(tried)} candidates)", len(tried)) as advance:
        for j in tried:
            loss, patch = _candidate(stack, batches, keep, states, j, fitting)
            if best is None or loss < best[0]:
                best = (loss, j, patch)
            advance(1)
    loss, j, patch = best
    layer = keep.pop(j)
    start = j
    if patch is not None:
        p = keep[j - 1]
        weight = down_proj(stack, p).weight
        originals.setdefault(p, weight.detach().clone())
        weight.data.copy_(patched_weight(originals[p], patch))
        start = j - 1
    # states[start] enters keep[start]; recompute everything after it
    del states[j + 1]
    for q in range(start, len(keep)):
        states[q + 1] = [stack.run(keep[q], h, b) for h, b in zip(states[q], batches, strict=True)]
    return layer, loss


def _candidate(
    stack: Stack,
    batches: list[Batch],
    keep: list[int],
    states: list,
    j: int,
    fitting: tuple,
) -> tuple[float, object]:
    """Calibration loss with ``keep[j]`` removed (and, with ``targets``, the patch fitted)."""
    targets, originals, ridge, weighting = fitting
    after = keep[j + 1 :]
    healable = targets is not None and 0 < j < len(keep) - 1
    if not healable:
        total, count = 0.0, 0
        for h, b in zip(states[j], batches, strict=True):
            s, c = stack.loss_sums(stack.run_many(after, h, b), b)
            total, count = total + s, count + c
        return total / max(count, 1), None
    # the run that removing keep[j] makes ends right before keep[j + 1]
    p, y_index = keep[j - 1], keep[j + 1]
    weight = down_proj(stack, p).weight
    current = weight.detach().clone()
    original = originals.get(p)  # p may carry the patch of an earlier, shorter run
    try:
        if original is not None:
            weight.data.copy_(original)
        t, parts = fit_patch(stack, p, states[j - 1], batches, targets[y_index], ridge, weighting)
    finally:
        weight.data.copy_(current)
    total, count = 0.0, 0
    for (r, m), b in zip(parts, batches, strict=True):
        h = r + apply_patch(m, t)
        s, c = stack.loss_sums(stack.run_many(after, h, b), b)
        total, count = total + s, count + c
    return total / max(count, 1), t.double()


def fit_patch(
    stack: Stack, p: int, inputs, batches: list[Batch], targets, ridge: float, weighting: str
):
    """The patch of block ``p`` (as it is now) fitted on the states ``inputs`` entering it
    to the states ``targets`` (one per batch), and per batch ``(r, m)``: its output without
    and with the MLP's part, so that ``r + m @ t`` is the patched block's output."""
    fit = GramFit(down_proj(stack, p).weight.shape[0])
    parts = []
    for h, b, y in zip(inputs, batches, targets, strict=True):
        out, m = mlp_parts(stack, p, h, b)
        fit.add(m[b.mask], (out - m)[b.mask], y[b.mask], weighting)
        parts.append((out - m, m))
    return fit.solve(ridge).float(), parts
