"""Selection strategy + healing (+ quality budget) -> a plan and its healed weights.

The calibration windows are split: a held-out share (only with ``--remove auto``) that
neither scoring nor fitting sees, the first ``select_tokens`` of the rest for greedy
selection, and all of the rest for scoring and fitting the healing patches.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from functools import partial

from .calibration import CalibrationSet
from .errors import PlanError
from .healing import (
    DEFAULT_RIDGE,
    DEFAULT_WEIGHTING,
    HealResult,
    check_healable,
    heal_linear,
    resolve_heal,
)
from .planning import Plan, make_plan
from .progress import ProgressFactory, no_progress
from .selection import (
    BLOCK_CANDIDATES,
    block_plan,
    check_strategy,
    greedy_plan,
    greedy_steps,
    healed_block_plan,
)

log = logging.getLogger(__name__)

DEFAULT_SELECT_TOKENS = 512  # greedy cost grows with it: see benchmarks/RESULTS.md
HOLDOUT_SHARE = 0.25
IN_LOOP_TOKENS_PER_DIM = 4  # greedy heal-in-the-loop needs tokens >> hidden size


@dataclass
class Recipe:
    """How to choose and repair: ``--select``, ``--heal`` and the ``--remove auto`` budget."""

    select: str = "score"
    heal: str = "none"
    auto: bool = False
    max_ppl_increase: float | None = None
    select_tokens: int = DEFAULT_SELECT_TOKENS
    ridge: float | None = DEFAULT_RIDGE  # None: chosen by held-out loss
    weighting: str | None = DEFAULT_WEIGHTING
    greedy_candidates: int | None = None  # greedy tries only this many lowest-scored
    block_candidates: int = BLOCK_CANDIDATES  # closest blocks compared after healing
    batch_size: int = 4

    def check(self, spec=None) -> None:
        check_strategy(self.select)
        if spec is not None:
            self.heal = resolve_heal(spec, self.heal)  # auto -> linear or none, for this family
        else:
            check_healable(None, self.heal)
        if self.auto and (self.max_ppl_increase is None or self.max_ppl_increase < 1.0):
            raise PlanError(
                "--remove auto needs --max-ppl-increase X with X >= 1",
                hint="e.g. --remove auto --max-ppl-increase 1.5",
            )


def subset(calib: CalibrationSet, rows) -> CalibrationSet:
    return CalibrationSet(
        input_ids=calib.input_ids[rows],
        attention_mask=calib.attention_mask[rows],
        source=calib.source,
        seq_len=calib.seq_len,
    )


def split_calibration(
    calib: CalibrationSet, holdout: bool
) -> tuple[CalibrationSet, CalibrationSet | None]:
    """(fitting windows, held-out windows or None): every 4th window is held out."""
    n = calib.input_ids.shape[0]
    if not holdout:
        return calib, None
    if n < 2:
        raise PlanError(
            f"--remove auto needs at least 2 calibration windows, got {n}",
            hint="pass more --calib-tokens or a shorter --seq-len",
        )
    step = max(2, round(1 / HOLDOUT_SHARE))
    held = [i for i in range(n) if i % step == step - 1] or [n - 1]
    fit = [i for i in range(n) if i not in set(held)]
    return subset(calib, fit), subset(calib, held)


def selection_windows(calib: CalibrationSet, tokens: int) -> CalibrationSet:
    rows = max(1, math.ceil(tokens / calib.seq_len))
    return subset(calib, slice(0, rows))


@dataclass
class Choice:
    plan: Plan
    heal: HealResult | None = None
    curve: list[dict] = field(default_factory=list)


class _Planner:
    """Plans for N = 0, 1, 2, ... removed layers under one strategy."""

    def __init__(self, loaded, calib, scores, recipe: Recipe, progress):
        self.loaded, self.calib, self.scores, self.recipe = loaded, calib, scores, recipe
        self.progress = progress
        self.steps = []
        self._greedy = None
        self._in_loop = False
        self._healed: dict[tuple[int, ...], HealResult] = {}  # heals done while choosing

    def plan(self, n: int) -> Plan:
        num_layers = self.scores.num_layers
        if self.recipe.select == "score":
            return make_plan(num_layers, self.scores.scores, remove=n, metric=self.scores.metric)
        if self.recipe.select == "block":
            distances = self.scores.block_distances
            if distances is None:
                raise PlanError("block selection needs block distances from the scoring pass")
            if self.recipe.heal == "none" or n == 0 or self.recipe.block_candidates < 2:
                return block_plan(num_layers, distances, n, self.scores.scores)
            choose_block = partial(healed_block_plan, self.loaded.model, self.loaded.source.spec)
            if self.loaded.model is None:  # offload.StreamedModel: one layer at a time
                from .streamed_healing import healed_block_streamed

                choose_block = partial(healed_block_streamed, self.loaded)
            plan, heal = choose_block(
                self.calib,
                distances,
                n,
                self.scores.scores,
                candidates=self.recipe.block_candidates,
                heal_options=self._heal_options(),
                batch_size=self.recipe.batch_size,
                progress=self.progress,
            )
            self._healed[tuple(plan.remove)] = heal
            return plan
        if self._greedy is None:
            windows = selection_windows(self.calib, self.recipe.select_tokens)
            self._in_loop = self._heal_in_loop(windows)
            steps = partial(greedy_steps, self.loaded.model, self.loaded.source.spec)
            if self.loaded.model is None:  # offload.StreamedModel: one layer at a time
                from .streamed_greedy import streamed_greedy_steps

                steps = partial(streamed_greedy_steps, self.loaded)
            self._greedy = steps(
                windows,
                heal=self._in_loop,
                ridge=self.recipe.ridge if self.recipe.ridge is not None else DEFAULT_RIDGE,
                batch_size=self.recipe.batch_size,
                scores=self.scores.scores,
                max_candidates=self.recipe.greedy_candidates,
                progress=self.progress,
            )
        while len(self.steps) < n:
            self.steps.append(next(self._greedy))
        return greedy_plan(
            num_layers,
            self.steps[:n],
            self.scores.scores,
            self._in_loop,
            shortlist=self.recipe.greedy_candidates,
        )

    def _heal_in_loop(self, windows: CalibrationSet) -> bool:
        """Fit patches inside the greedy loop only with enough tokens for a hidden x hidden
        map: on 512 tokens of the default model (hidden 576) the in-loop fits overfit and
        chose badly (benchmarks/RESULTS.md); then the plain picks are healed afterwards."""
        config = getattr(self.loaded.model, "config", None) or self.loaded.source.config
        hidden = int(getattr(config, "hidden_size", 0))
        enough = windows.tokens >= IN_LOOP_TOKENS_PER_DIM * hidden
        if self.recipe.heal != "none" and not enough:
            log.warning(
                "greedy: %d selection tokens are too few to fit patches in the loop "
                "(need %d); choosing without, healing afterwards",
                windows.tokens,
                IN_LOOP_TOKENS_PER_DIM * hidden,
            )
        return self.recipe.heal != "none" and enough

    def close(self) -> None:
        if self._greedy is not None:
            self._greedy.close()  # restores any weights patched during the search

    def _heal_options(self) -> dict:
        return {
            "ridge": self.recipe.ridge,
            "weighting": self.recipe.weighting,
            "refit": self.recipe.heal == "refit",
        }

    def heal(self, plan: Plan) -> HealResult | None:
        if self.recipe.heal == "none" or not plan.remove:
            return None
        if tuple(plan.remove) in self._healed:
            return self._healed[tuple(plan.remove)]
        if self.loaded.model is None:  # offload.StreamedModel: one layer at a time
            from .streamed_healing import heal_streamed

            heal = partial(heal_streamed, self.loaded)
        else:
            heal = partial(heal_linear, self.loaded.model, self.loaded.source.spec)
        return heal(
            self.calib,
            plan.remove,
            batch_size=self.recipe.batch_size,
            progress=self.progress,
            **self._heal_options(),
        )


def held_out_perplexity(loaded, calib: CalibrationSet, keep, weights, batch_size: int) -> float:
    """Perplexity of the (pruned, healed) model on ``calib``'s real next tokens."""
    import torch

    if loaded.model is None:  # offload.StreamedModel: one layer at a time
        from .offload import stream_mean_loss

        return math.exp(stream_mean_loss(loaded, calib, list(keep), weights, batch_size=batch_size))

    from .layerwise import Stack
    from .pruning import healed, pruned_view

    spec = loaded.source.spec
    stack = Stack(loaded.model, spec)
    total, count = 0.0, 0
    with (
        torch.inference_mode(),
        healed(loaded.model, keep, weights),
        pruned_view(loaded.model, spec, keep),
    ):
        batches = Stack(loaded.model, spec).record(calib, batch_size)
        pruned = Stack(loaded.model, spec)
        for batch in batches:
            hidden = pruned.run_many(range(len(keep)), batch.embeds, batch)
            s, c = stack.loss_sums(hidden, batch)
            total, count = total + s, count + c
    return math.exp(total / max(count, 1))


def choose(
    loaded,
    calib: CalibrationSet,
    scores,
    recipe: Recipe,
    *,
    remove: int | None = None,
    ratio: float | None = None,
    layers: list[int] | None = None,
    held_out: CalibrationSet | None = None,
    progress: ProgressFactory = no_progress,
) -> Choice:
    """The plan (and healing) for the request; with ``recipe.auto`` the largest N in budget."""
    recipe.check(loaded.source.spec)
    planner = _Planner(loaded, calib, scores, recipe, progress)
    try:
        if layers is not None:
            plan = make_plan(scores.num_layers, scores.scores, layers=layers, metric=scores.metric)
        elif recipe.auto:
            return _auto(loaded, planner, held_out, recipe, progress)
        else:
            n = make_plan(scores.num_layers, scores.scores, remove=remove, ratio=ratio).remove
            plan = planner.plan(len(n))
    finally:
        planner.close()
    return Choice(plan=plan, heal=planner.heal(plan))


def _auto(loaded, planner: _Planner, held_out, recipe: Recipe, progress) -> Choice:
    if held_out is None:
        raise PlanError("--remove auto needs held-out calibration windows")
    num_layers = planner.scores.num_layers
    base = held_out_perplexity(loaded, held_out, list(range(num_layers)), None, recipe.batch_size)
    limit = base * recipe.max_ppl_increase
    curve = [{"removed": 0, "perplexity": round(base, 4)}]
    best = Choice(plan=planner.plan(0))
    with progress(f"budget: held-out perplexity <= {limit:.2f}", num_layers - 1) as advance:
        for n in range(1, num_layers):
            plan = planner.plan(n)
            heal = planner.heal(plan)
            weights = heal.weights if heal else None
            ppl = held_out_perplexity(loaded, held_out, plan.keep, weights, recipe.batch_size)
            curve.append({"removed": n, "perplexity": round(ppl, 4), "remove": plan.remove})
            advance(1)
            if not ppl <= limit:
                break
            best = Choice(plan=plan, heal=heal)
    best.curve = curve
    best.plan.budget = {
        "max_ppl_increase": recipe.max_ppl_increase,
        "held_out": held_out.describe(),
        "original_perplexity": round(base, 4),
        "limit": round(limit, 4),
        "chosen": len(best.plan.remove),
        "curve": curve,
    }
    best.plan.reason += f"; the most layers within {recipe.max_ppl_increase}x held-out perplexity"
    return best
