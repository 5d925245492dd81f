"""Choose the layers to remove: ``plan.json``."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import PlanError, ShortGPTError

DEFAULT_RATIO = 0.25  # ShortGPT removes about a quarter of the layers


@dataclass
class Plan:
    """The contents of ``plan.json``."""

    num_layers: int
    remove: list[int]
    keep: list[int]
    metric: str
    reason: str
    scores: list[float] | None = field(default=None)
    strategy: str = "score"  # score | greedy | block (selection.py)
    selection: dict | None = None  # what the strategy measured: per-step losses, distances
    heal: dict | None = None  # healing.py: method, per-run fit residuals
    budget: dict | None = None  # --remove auto: the held-out perplexity curve
    patch_file: str | None = None  # healed weights, relative to plan.json's folder
    root: str | None = field(default=None, compare=False)  # that folder; not saved

    @classmethod
    def removing(cls, num_layers: int, remove: list[int], **fields) -> Plan:
        """A plan that removes ``remove`` (sorted) and keeps every other layer, in order."""
        gone = set(remove)
        keep = [i for i in range(num_layers) if i not in gone]
        return cls(num_layers=num_layers, remove=sorted(remove), keep=keep, **fields)

    def to_json(self) -> str:
        data = asdict(self)
        del data["root"]
        return json.dumps(data, indent=2, allow_nan=False) + "\n"  # strict JSON

    def save(self, path: Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    def patch_path(self) -> Path | None:
        """The healed-weights file, or None for a plain removal."""
        if not self.patch_file:
            return None
        return Path(self.root or ".") / self.patch_file

    def patch_weights(self, spec) -> dict | None:
        """Healed down-projection weights by original layer index, or None."""
        from .healing import load_patches

        path = self.patch_path()
        return load_patches(path, spec) if path is not None else None

    @classmethod
    def load(cls, path: Path) -> Plan:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            plan = cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        except (OSError, ValueError, TypeError, RecursionError) as exc:
            raise PlanError(f"cannot read plan {path}: {exc}", hint="pass a plan.json") from exc
        plan.root = str(Path(path).parent)
        if plan.patch_file and not (plan.patch_path() or Path()).is_file():
            raise PlanError(
                f"{path} names healed weights {plan.patch_file} that are not beside it",
                hint="keep the plan's folder together",
            )
        check_indices(plan.remove, plan.num_layers)
        if sorted(plan.keep + plan.remove) != list(range(plan.num_layers)):
            raise PlanError(f"{path}: keep and remove do not partition {plan.num_layers} layers")
        return plan


def parse_layer_list(text: str) -> list[int]:
    """``"3,7,11"`` -> ``[3, 7, 11]``, with a clear error for anything else."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise PlanError(
            f"--layers {text!r} is not a comma-separated list of integers",
            hint="e.g. --layers 3,7,11",
        ) from exc


def check_indices(layers: list[int], num_layers: int) -> None:
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise PlanError(
            f"layer indices {bad} are out of range for a model with {num_layers} layers",
            hint=f"use indices 0..{num_layers - 1}",
        )
    if len(set(layers)) != len(layers):
        raise PlanError(f"layer list {layers} repeats an index")
    if len(layers) >= num_layers:
        raise PlanError(f"cannot remove all {num_layers} layers", hint="keep at least one")


def make_plan(
    num_layers: int,
    scores: list[float] | None = None,
    *,
    remove: int | None = None,
    ratio: float | None = None,
    layers: list[int] | None = None,
    metric: str = "bi",
) -> Plan:
    """Remove ``layers`` explicitly, or the ``remove`` (or ``ratio`` of all) lowest-scored.

    With none of the three given, a quarter of the layers (rounded down) go.
    """
    if sum(x is not None for x in (remove, ratio, layers)) > 1:
        raise PlanError("give only one of --remove, --ratio and --layers")
    if layers is not None:
        check_indices(layers, num_layers)
        chosen, reason = sorted(layers), f"remove layers {sorted(layers)} as asked"
    else:
        if remove is None:
            ratio = DEFAULT_RATIO if ratio is None else ratio
            if not 0 <= ratio < 1:
                raise PlanError(f"--ratio {ratio} is outside [0, 1)", hint="e.g. --ratio 0.25")
            remove = math.floor(ratio * num_layers)
        if not 0 <= remove < num_layers:
            raise PlanError(
                f"--remove {remove} is not possible for a model with {num_layers} layers",
                hint=f"use 0..{num_layers - 1}",
            )
        if scores is None:
            raise ShortGPTError("choosing layers by score needs scores")
        order = sorted(range(num_layers), key=lambda i: (scores[i], i))
        chosen = sorted(order[:remove])
        reason = f"remove {remove} lowest-{metric.upper() if metric == 'bi' else metric} layers"
    return Plan.removing(
        num_layers,
        chosen,
        metric=metric,
        reason=reason,
        scores=list(scores) if scores is not None else None,
    )
