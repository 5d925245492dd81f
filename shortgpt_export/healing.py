"""Training-free linear healing: one least-squares patch per removed run of layers.

For each maximal run of removed layers ``[a..b]`` with a kept layer ``p = a - 1`` before
it, a linear map ``T`` (hidden x hidden) is fitted by ridge least squares so that layer
p's MLP output ``m`` times ``T`` plus p's post-attention residual ``r`` reproduces the
original model's output of layer ``b``::

    min_T  sum_tokens |r + m T - y|^2 + lam |T - I|^2

Only hidden x hidden Gram matrices are accumulated (float64, pads masked), never all
tokens' activations. Since ``m = act W^T``, ``m T = act (T^T W)^T``: the patch is merged
into p's down projection (``W <- T^T W``) and the model keeps its architecture. Runs are
healed front to back on the pruned model, each fitted against the original model's
hidden states, so later fits see the earlier patches.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from .architectures import ArchitectureSpec, submodule
from .calibration import CalibrationSet
from .errors import ShortGPTError
from .layerwise import Batch, Stack, mean_loss
from .progress import ProgressFactory, no_progress

log = logging.getLogger(__name__)

HEAL_METHODS = ("auto", "none", "linear", "refit")  # refit: linear + kept layers after the cut
# auto: linear where the family allows it (RESULTS.md: it lowers perplexity at N = 4, 7, 8
# with BI selection), else none, with a log line (resolve_heal)
DEFAULT_HEAL = "auto"
DEFAULT_RIDGE = 1e-3  # times the mean diagonal of m^T m
RIDGES = (1e-3, 1e-2, 1e-1)  # tried when the ridge is chosen by held-out loss
WEIGHTINGS = ("none", "token")
DEFAULT_WEIGHTING = "token"  # measured better on the default model (benchmarks)
PATCH_FILE = "heal.safetensors"
FEW_TOKENS_PER_DIM = 16  # fitting tokens per hidden dimension below which a heal warns


class HealingError(ShortGPTError):
    """This model family cannot be healed by merging a patch into its MLP."""


def check_healable(spec: ArchitectureSpec | None, method: str) -> None:
    if method not in HEAL_METHODS:
        raise ShortGPTError(f"unknown --heal {method!r}", hint=f"use {' or '.join(HEAL_METHODS)}")
    if method in ("linear", "refit") and spec is not None and not spec.healable:
        raise HealingError(
            f"--heal {method} cannot patch {spec.display_name}: it has {_unhealable_why(spec)}",
            hint="use --heal none (or --heal auto, which removes without healing here)",
        )


def resolve_heal(spec: ArchitectureSpec, method: str) -> str:
    """``auto`` -> ``linear`` where ``spec`` can be healed linearly, else ``none`` (logged);
    an explicit ``linear`` on a family that cannot be healed raises (check_healable)."""
    if method != "auto":
        check_healable(spec, method)
        return method
    if spec.healable:
        return "linear"
    log.warning(
        "not healing: %s has %s, so a linear patch cannot be merged into it "
        "(plain removal; --heal none silences this)",
        spec.display_name,
        _unhealable_why(spec),
    )
    return "none"


def _unhealable_why(spec: ArchitectureSpec) -> str:
    if not spec.mlp_path:
        return "no MLP (a state-space / recurrent block)"
    if not spec.down_proj_path:
        return "no single MLP down projection (mixture of experts)"
    return "a norm or scale between its MLP output and the residual stream"


def removed_runs(remove: list[int]) -> list[tuple[int, int]]:
    """Maximal runs ``(a, b)`` of consecutive removed layers, front to back."""
    runs: list[tuple[int, int]] = []
    for index in sorted(remove):
        if runs and runs[-1][1] == index - 1:
            runs[-1] = (runs[-1][0], index)
        else:
            runs.append((index, index))
    return runs


def skip_reason(run: tuple[int, int], num_layers: int) -> str | None:
    if run[0] == 0:
        return "starts at layer 0: no kept layer before it to patch"
    if run[1] == num_layers - 1:
        return "ends at the last layer: the final norm follows, no hidden state to match"
    return None


class GramFit:
    """Running sums for ``min_T |r + m T - y|^2`` (float64), and the ridge solution."""

    def __init__(self, hidden: int):
        import torch

        self.mm = torch.zeros(hidden, hidden, dtype=torch.float64)
        self.me = torch.zeros(hidden, hidden, dtype=torch.float64)
        self.ee = 0.0  # sum |y - r|^2
        self.yy = 0.0  # sum |y|^2
        self.tokens = 0

    def add(self, m, r, y, weighting: str = "none") -> None:
        """Rows of real tokens only: ``m``, ``r``, ``y`` are [tokens, hidden].

        ``weighting="token"`` weighs each token by ``1 / |y|^2``, so that the few tokens
        with massive activations (attention sinks) do not decide the fit alone.
        """
        # the sums stay on the CPU in float64 (which MPS lacks), whatever the model's device
        m, r, y = m.detach().cpu(), r.detach().cpu(), y.detach().cpu()
        m, e, y = m.double(), (y.double() - r.double()), y.double()
        w = None
        if weighting == "token":
            w = 1.0 / (y * y).sum(-1, keepdim=True).clamp_min(1e-12)
        mw = m * w if w is not None else m
        self.mm += mw.T @ m
        self.me += mw.T @ e
        self.ee += float(((e * w) if w is not None else e).mul(e).sum())
        self.yy += float(((y * w) if w is not None else y).mul(y).sum())
        self.tokens += m.shape[0]

    def solve(self, ridge: float = DEFAULT_RIDGE):
        import torch

        eye = torch.eye(self.mm.shape[0], dtype=torch.float64)
        lam = ridge * float(self.mm.diagonal().mean())
        return torch.linalg.solve(self.mm + lam * eye, self.me + lam * eye)

    def relative_residual(self, t) -> float:
        """``|r + m T - y| / |y|`` over the accumulated tokens."""
        sq = float((t * (self.mm @ t)).sum() - 2 * (t * self.me).sum()) + self.ee
        return (max(sq, 0.0) / self.yy) ** 0.5 if self.yy else 0.0


def mlp_parts(stack: Stack, index: int, hidden, batch: Batch):
    """Run block ``index``; returns (its output, its MLP output ``m``); ``r`` = out - m."""
    captured = {}
    mlp = submodule(stack.layers[index], stack.spec.mlp_path)
    handle = mlp.register_forward_hook(lambda mod, args, out: captured.__setitem__("m", out))
    try:
        out = stack.run(index, hidden, batch)
    finally:
        handle.remove()
    return out, captured["m"]


def down_proj(stack: Stack, index: int):
    return submodule(stack.layers[index], stack.spec.down_proj_path)


def patched_weight(weight, t):
    """``T^T W`` in ``weight``'s dtype and on its device (``t`` float64 on the CPU, where
    the product is computed)."""
    merged = t.T @ weight.detach().cpu().double()
    return merged.to(device=weight.device, dtype=weight.dtype)


def apply_patch(m, t):
    """``m @ T`` on ``m``'s device and in its dtype (``t`` a patch from :class:`GramFit`)."""
    return m @ t.to(device=m.device, dtype=m.dtype)


@dataclass
class HealResult:
    """Patched down-projection weights by original layer index, and what each fit did."""

    weights: dict[int, object] = field(default_factory=dict)
    runs: list[dict] = field(default_factory=list)
    ridge: float | None = DEFAULT_RIDGE
    tokens: int = 0
    held_out_tokens: int = 0
    seconds: float = 0.0
    weighting: str | None = DEFAULT_WEIGHTING
    guard: bool = True
    refit: bool | dict = False

    def describe(self) -> dict:
        return {
            "method": "refit" if self.refit else "linear",
            "ridge": self.ridge if self.ridge is not None else "chosen by held-out loss",
            "weighting": self.weighting or "chosen by held-out loss",
            "guard": self.guard,
            "refit": self.refit,
            "tokens": self.tokens,
            "held_out_tokens": self.held_out_tokens,
            "seconds": round(self.seconds, 3),
            "runs": self.runs,
        }


def guard_batch_size(batch_size: int, rows: int) -> int:
    """Batch size for ``rows`` calibration windows that leaves at least 2 batches whenever
    there are 2 windows, so that :func:`guard_split` has one to hold out."""
    return min(batch_size, max(1, rows // 2))


def guard_split(count: int) -> tuple[list[int], list[int]]:
    """(fitting, held-out) batch indices: every 4th batch is held out (at least one)."""
    if count < 2:
        return list(range(count)), []
    held = [k for k in range(count) if k % 4 == 3] or [count - 1]
    return [k for k in range(count) if k not in set(held)], held


def candidates(ridge: float | None, weighting: str | None) -> list[tuple[str, float]]:
    """(weighting, ridge) pairs to try; ``None`` means try all of :data:`RIDGES` /
    :data:`WEIGHTINGS`."""
    weightings = [weighting] if weighting is not None else list(WEIGHTINGS)
    ridges = [ridge] if ridge is not None else list(RIDGES)
    for w in weightings:
        if w not in WEIGHTINGS:
            raise ShortGPTError(f"unknown weighting {w!r}", hint=f"use one of {WEIGHTINGS}")
    return [(w, r) for w in weightings for r in ridges]


def check_heal_options(
    spec: ArchitectureSpec, ridge: float | None, weighting: str | None, guard: bool, refit: bool
) -> list[tuple[str, float]]:
    """The (weighting, ridge) candidates of a linear heal, after checking the options."""
    check_healable(spec, "linear")
    if not guard and (ridge is None or weighting is None or refit):
        raise ShortGPTError(
            "choosing the ridge or weighting, or refitting, needs held-out windows",
            hint="pass guard=True",
        )
    return candidates(ridge, weighting)


def runs_to_heal(remove: list[int], num_layers: int, result: HealResult) -> list[tuple[int, int]]:
    """The removed runs that can be healed; the others go into ``result.runs`` (logged)."""
    todo = []
    for run in removed_runs(remove):
        reason = skip_reason(run, num_layers)
        if reason:
            log.warning("run of layers %d..%d left unhealed: %s", run[0], run[1], reason)
            result.runs.append({"run": list(run), "patched_layer": None, "skipped": reason})
        else:
            todo.append(run)
    return todo


def skip_unguarded(todo: list[tuple[int, int]], result: HealResult) -> HealResult:
    """Every run left unhealed: the guard has no held-out window."""
    for a, b in todo:
        reason = "guard: fewer than 2 calibration windows, none to hold out"
        log.warning("run of layers %d..%d left unhealed: %s", a, b, reason)
        result.runs.append({"run": [a, b], "patched_layer": None, "skipped": reason})
    result.runs.sort(key=lambda entry: entry["run"][0])
    return result


def solve_candidates(fits: dict, tries: list[tuple[str, float]], guard: bool) -> list:
    """``T`` of every candidate (the first alone without the guard: nothing to compare)."""
    return [fits[w].solve(lam) for w, lam in (tries if guard else tries[:1])]


def judge_patch(
    run: tuple[int, int],
    fits: dict,
    tries: list[tuple[str, float]],
    solved: list,
    losses: list[float] | None,
    unhealed_loss: float | None,
) -> tuple[dict, object | None, float | None]:
    """The plan entry of run ``(a, b)``, the ``T`` to merge into layer ``a - 1`` (None when
    the guard leaves the run unhealed) and its held-out loss.

    ``solved`` holds ``T`` per candidate of ``tries``; ``losses`` their held-out losses
    (None without the guard), ``unhealed_loss`` the loss without this patch."""
    import torch

    a, b = run
    entry: dict = {"run": [a, b], "patched_layer": a - 1}
    if losses is not None:
        best = min(range(len(solved)), key=lambda i: losses[i])
        loss = losses[best]
        entry.update(
            held_out_loss_unhealed=round(unhealed_loss, 6),
            held_out_loss_healed=round(loss, 6),
        )
        if len(solved) > 1:
            entry["candidates"] = [
                {"weighting": cw, "ridge": cr, "held_out_loss": round(cl, 6)}
                for (cw, cr), cl in zip(tries, losses, strict=True)
            ]
    else:
        best, loss = 0, None
    (w, lam), t, fit = tries[best], solved[best], fits[tries[best][0]]
    eye = torch.eye(t.shape[0], dtype=torch.float64)
    entry.update(
        weighting=w,
        ridge=lam,
        residual_before=round(fit.relative_residual(eye), 6),
        residual_after=round(fit.relative_residual(t), 6),
    )
    if losses is not None and not loss < unhealed_loss:
        entry["patched_layer"] = None
        entry["skipped"] = (
            f"guard: held-out loss {loss:.4f} with the patch, {unhealed_loss:.4f} without"
        )
        log.warning("run of layers %d..%d left unhealed: %s", a, b, entry["skipped"])
        return entry, None, loss
    log.info("healed run %d..%d into layer %d: %s", a, b, a - 1, entry)
    return entry, t, loss


def merged_weight(stack: Stack, p: int, original, t):
    """Layer ``p``'s down projection with ``T`` merged into ``original`` (its weight)."""
    if down_proj(stack, p).bias is not None:
        raise HealingError(f"layer {p}'s down projection has a bias")
    return patched_weight(original, t)


def _warn_if_few_tokens(tokens: int, stack: Stack) -> None:
    """A patch is hidden x hidden: with few tokens per dimension it fits the calibration
    text's noise (the guard then rejects it, or it helps less than it could)."""
    hidden = getattr(stack.model.config, "hidden_size", None)
    if hidden and tokens < FEW_TOKENS_PER_DIM * hidden:
        log.warning(
            "healing fits %d x %d patches on %d calibration tokens (< %d per dimension): "
            "expect a weaker heal; pass more text (--calib FILE --calib-tokens N, "
            "benchmarks/RESULTS.md: 49,152 tokens healed best)",
            hidden,
            hidden,
            tokens,
            FEW_TOKENS_PER_DIM,
        )


def heal_linear(
    model,
    spec: ArchitectureSpec,
    calib: CalibrationSet,
    remove: list[int],
    *,
    ridge: float | None = DEFAULT_RIDGE,
    weighting: str | None = DEFAULT_WEIGHTING,
    guard: bool = True,
    refit: bool = False,
    batch_size: int = 4,
    batches: list[Batch] | None = None,
    original_states: list | None = None,
    progress: ProgressFactory = no_progress,
) -> HealResult:
    """Fit one patch per healable removed run; ``model`` is left unchanged.

    With ``guard`` (the default) every 4th batch of calibration windows is held out of the
    fits; a run's patch is kept only if it lowers the pruned model's next-token loss on
    those windows compared with no patch, else the run is left unhealed (plan and log say
    so, with both losses). ``ridge`` / ``weighting`` ``None``: try every value of
    :data:`RIDGES` / :data:`WEIGHTINGS` and keep the lowest held-out loss (needs ``guard``).

    ``refit`` (needs ``guard``): after the run patches, refit the down projection of every
    kept layer from the first cut on, front to back, so that its output matches the
    original model's state entering the next kept layer (the final state for the last);
    see :func:`_refit_kept`.

    ``batches`` and ``original_states`` (per block input, per batch: ``[n + 1][batch]``
    from :class:`Stack`) may be passed in when several plans are healed on one model.
    """
    import time

    import torch

    tries = check_heal_options(spec, ridge, weighting, guard, refit)
    began = time.perf_counter()
    stack = Stack(model, spec)
    n = len(stack.layers)
    keep = [i for i in range(n) if i not in set(remove)]
    result = HealResult(ridge=ridge, weighting=weighting, guard=guard, refit=refit)
    todo = runs_to_heal(remove, n, result)
    if not todo and not refit:
        return result
    originals = {a - 1: down_proj(stack, a - 1).weight.detach().clone() for a, _ in todo}
    try:
        with torch.inference_mode():
            if batches is None:
                rows = calib.input_ids.shape[0]
                size = guard_batch_size(batch_size, rows) if guard else batch_size
                batches = stack.record(calib, size)
            fitting, held = guard_split(len(batches)) if guard else (list(range(len(batches))), [])
            if guard and not held:
                return skip_unguarded(todo, result)
            # the original model's output of each run's last layer, per fit batch
            targets: dict[int, dict[int, object]] = {}
            # blocks before ``position`` are kept and unpatched: the pruned model's state
            # entering it is the original's
            position = first = max(min(remove) - 1, 0)
            if original_states is None and refit:
                original_states = record_original_states(stack, batches, progress)
            if original_states is not None:
                targets = {
                    k: {b: original_states[b + 1][k][batches[k].mask] for _, b in todo}
                    for k in fitting
                }
                states = list(original_states[position])
            else:
                states, targets_for = [], set(fitting)
                last = max(b for _, b in todo)
                with progress("healing: original hidden states", len(batches)) as advance:
                    for k, batch in enumerate(batches):
                        if k not in targets_for:
                            states.append(stack.run_many(range(position), batch.embeds, batch))
                            advance(1)
                            continue
                        hidden, wanted = batch.embeds, {}
                        for index in range(last + 1):
                            if index == position:
                                states.append(hidden)
                            hidden = stack.run(index, hidden, batch)
                            if any(b == index for _, b in todo):
                                wanted[index] = hidden[batch.mask]
                        targets[k] = wanted
                        advance(1)
            result.held_out_tokens = sum(batches[k].tokens for k in held)
            _warn_if_few_tokens(sum(batches[k].tokens for k in fitting), stack)
            unhealed_loss = None
            # the pruned model's state per batch (entering keep[position]), front to back
            with progress("healing: fitting patches", len(todo)) as advance:
                for a, b in todo:
                    p = a - 1
                    stop = keep.index(p)
                    fits = {w: GramFit(states[0].shape[-1]) for w in {w for w, _ in tries}}
                    parts = {}
                    for k, batch in enumerate(batches):
                        states[k] = stack.run_many(keep[position:stop], states[k], batch)
                        out, m = mlp_parts(stack, p, states[k], batch)
                        if k in targets:
                            for w, fit in fits.items():
                                fit.add(m[batch.mask], (out - m)[batch.mask], targets[k][b], w)
                        else:
                            parts[k] = (out - m, m)
                    position = stop
                    after = keep[stop + 1 :]

                    def held_loss(t, parts=parts, after=after):
                        total, count = 0.0, 0
                        for k in held:
                            r, m = parts[k]
                            h = r + m if t is None else r + apply_patch(m, t)
                            s, c = stack.loss_sums(stack.run_many(after, h, batches[k]), batches[k])
                            total, count = total + s, count + c
                        return total / max(count, 1)

                    solved = solve_candidates(fits, tries, guard)
                    losses = None
                    if guard:
                        if unhealed_loss is None:
                            unhealed_loss = held_loss(None)
                        losses = [held_loss(t) for t in solved]
                    entry, t, loss = judge_patch((a, b), fits, tries, solved, losses, unhealed_loss)
                    result.tokens = fits[entry["weighting"]].tokens
                    if t is not None:
                        weight = down_proj(stack, p).weight
                        weight.data.copy_(merged_weight(stack, p, originals[p], t))
                        result.weights[p] = weight.detach().clone()
                        if guard:
                            unhealed_loss = loss
                    result.runs.append(entry)
                    advance(1)
            if refit:
                result.refit = _refit_kept(
                    stack,
                    keep,
                    first,
                    batches,
                    held,
                    original_states,
                    tries,
                    originals,
                    result.weights,
                    unhealed_loss,
                    progress,
                )
    finally:
        for p, weight in originals.items():
            down_proj(stack, p).weight.data.copy_(weight)
    # plain (not inference-mode) tensors, so they can become parameters' data later
    result.weights = {p: w.clone() for p, w in result.weights.items()}
    result.runs.sort(key=lambda entry: entry["run"][0])
    result.seconds = time.perf_counter() - began
    return result


def record_original_states(
    stack: Stack, batches: list[Batch], progress, indices: set[int] | None = None
) -> list:
    """The original model's state entering every block (and the final one), per batch;
    with ``indices``, only those entries are kept (the others are ``None``)."""
    n = len(stack.layers)
    wanted = set(range(n + 1)) if indices is None else set(indices)
    last = max(wanted, default=0)
    states: list = [None] * (n + 1)
    current = [b.embeds for b in batches]
    with progress("healing: original hidden states", last) as advance:
        for index in range(last + 1):
            if index in wanted:
                states[index] = current
            if index < last:
                current = [stack.run(index, h, b) for h, b in zip(current, batches, strict=True)]
                advance(1)
    return states


def _refit_kept(
    stack: Stack,
    keep: list[int],
    first: int,
    batches: list[Batch],
    held: list[int],
    original_states: list,
    tries: list[tuple[str, float]],
    originals: dict,
    weights: dict,
    baseline: float | None,
    progress,
) -> dict:
    """Refit the down projection of ``keep[first:]`` front to back (model patched in place,
    ``originals`` gets each layer's weight before, ``weights`` the kept results).

    Kept layer ``q``'s MLP output times ``T_q``, plus its post-attention residual, is fitted
    to the original model's state entering the next kept layer. A layer's refit is kept if
    it lowers the held-out relative residual (unweighted) of that match; the whole set is
    kept only if it lowers the held-out next-token loss below ``baseline`` (the run-patched
    model's), else every refit is undone.
    """

    n = len(stack.layers)
    states = list(original_states[first])
    changed: dict[int, object] = {}  # layer -> its weight before the refit
    layers = []
    if baseline is None:
        finals = [
            stack.run_many(keep[first:], states[k], batches[k]) if k in held else None
            for k in range(len(batches))
        ]
        baseline = mean_loss(stack, [finals[k] for k in held], [batches[k] for k in held])
    with progress("healing: refitting kept layers", len(keep) - first) as advance:
        for idx in range(first, len(keep)):
            q = keep[idx]
            target = keep[idx + 1] if idx + 1 < len(keep) else n
            hidden = states[0].shape[-1]
            fits = {w: GramFit(hidden) for w in {w for w, _ in tries}}
            check = GramFit(hidden)  # held-out, unweighted
            parts = []
            for k, batch in enumerate(batches):
                out, m = mlp_parts(stack, q, states[k], batch)
                y = original_states[target][k][batch.mask]
                mm, rr = m[batch.mask], (out - m)[batch.mask]
                if k in held:
                    check.add(mm, rr, y, "none")
                else:
                    for w, fit in fits.items():
                        fit.add(mm, rr, y, w)
                parts.append((out, m))
            entry, t = choose_refit(q, fits, check, tries)
            layers.append(entry)
            linear = down_proj(stack, q)
            if t is not None:
                originals.setdefault(q, linear.weight.detach().clone())
                changed[q] = linear.weight.detach().clone()
                linear.weight.data.copy_(patched_weight(changed[q], t))
                states = [out - m + apply_patch(m, t) for out, m in parts]
            else:
                states = [out for out, _ in parts]
            advance(1)
    loss = mean_loss(stack, [states[k] for k in held], [batches[k] for k in held])
    record = refit_record(baseline, loss, layers)
    if record["kept"]:
        for q in changed:
            weights[q] = down_proj(stack, q).weight.detach().clone()
    else:
        for q, weight in changed.items():
            down_proj(stack, q).weight.data.copy_(weight)
    return record


def choose_refit(q: int, fits: dict, check: GramFit, tries: list[tuple[str, float]]):
    """(log entry, ``T`` or None) of kept layer ``q``'s refit: the candidate with the
    lowest held-out relative residual (``check``), kept only if it lowers it."""
    import torch

    eye = torch.eye(check.mm.shape[0], dtype=torch.float64)
    before = check.relative_residual(eye)
    scored = []
    for w, lam in tries:
        t = fits[w].solve(lam)
        scored.append((check.relative_residual(t), w, lam, t))
    after, w, lam, t = min(scored, key=lambda x: x[0])
    entry = {
        "layer": q,
        "held_out_residual_before": round(before, 6),
        "held_out_residual_after": round(after, 6),
        "weighting": w,
        "ridge": lam,
        "kept": after < before,
    }
    return entry, (t if after < before else None)


def refit_record(baseline: float, loss: float, layers: list[dict]) -> dict:
    """``heal.refit`` of plan.json: kept only if the held-out loss went down (logged if
    not)."""
    kept = loss < baseline
    if not kept:
        log.warning(
            "refit of the kept layers undone: held-out loss %.4f with it, %.4f without",
            loss,
            baseline,
        )
    return {
        "kept": kept,
        "held_out_loss_before": round(baseline, 6),
        "held_out_loss_after": round(loss, 6),
        "layers": layers,
    }


def patched_loss(
    stack: Stack,
    batches: list[Batch],
    states: list,
    keep: list[int],
    weights: dict[int, object] | None = None,
    which: list[int] | None = None,
) -> float:
    """Mean next-token loss of the model that keeps ``keep`` with the patched down
    projections ``weights`` (by original layer), on batches ``which`` (default: all).

    ``states[i][k]`` is the original model's state entering block ``i`` for batch ``k``;
    the blocks before the first removed or patched one are the original's, so the pruned
    model runs only from there (``states`` may hold ``None`` at the indices not needed).
    """
    import torch

    n = len(stack.layers)
    weights = weights or {}
    touched = (set(range(n)) - set(keep)) | set(weights)
    start = min(touched) if touched else n
    which = range(len(batches)) if which is None else which
    saved = {}
    try:
        with torch.inference_mode():
            for p, w in weights.items():
                linear = down_proj(stack, p)
                saved[p] = linear.weight.data
                linear.weight.data = w.to(saved[p].dtype)
            after = [i for i in keep if i >= start]
            finals = [stack.run_many(after, states[start][k], batches[k]) for k in which]
            return mean_loss(stack, finals, [batches[k] for k in which])
    finally:
        for p, data in saved.items():
            down_proj(stack, p).weight.data = data


def save_patches(
    path: Path, spec: ArchitectureSpec, weights: dict[int, object], dtype=None
) -> None:
    """Write the patched weights under their checkpoint names (original layer indices)."""
    from safetensors.torch import save_file

    tensors = {
        spec.down_proj_tensor(p): (w if dtype is None else w.to(dtype)).contiguous()
        for p, w in sorted(weights.items())
    }
    save_file(tensors, str(path), metadata={"format": "pt", "shortgpt_export": "heal"})


def load_patches(path: Path, spec: ArchitectureSpec) -> dict[int, object]:
    """Patched weights by original layer index, as :func:`save_patches` wrote them."""
    from safetensors.torch import load_file

    weights = {}
    for name, tensor in load_file(str(path)).items():
        layer = spec.layer_of(name)
        if layer is None or name != spec.down_proj_tensor(layer):
            raise ShortGPTError(f"{path}: unexpected tensor {name}", hint="re-run the healing")
        weights[layer] = tensor
    return weights
