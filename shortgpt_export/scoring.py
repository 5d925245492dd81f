"""Block Influence (ShortGPT) and angular distance of every decoder layer, in one pass.

Forward hooks on the decoder blocks compare each block's input and output hidden state
token by token and add the result to per-layer running sums. Hidden states of all layers
are never kept; padding tokens are masked out; sums are float64.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .calibration import CalibrationSet
from .errors import ShortGPTError
from .progress import ProgressFactory, no_progress

log = logging.getLogger(__name__)

METRICS = ("bi", "angular")
# What each metric measures between a layer's input and output hidden state, for plots,
# model cards and reports: (short formula, the sentence with its source).
METRIC_TEXT = {
    "bi": (
        "1 - mean cosine",
        "Block Influence = 1 - mean cosine similarity between a layer's input and output "
        "hidden state; Men et al. 2024, arXiv 2403.03853",
    ),
    "angular": (
        "mean arccos(cos)/pi",
        "angular distance = mean arccos(cosine similarity)/pi between a layer's input and "
        "output hidden state; Gromov et al. 2024, arXiv 2403.17887",
    ),
}


def token_metric(x, y, metric: str):
    """Per-token score between block input ``x`` and output ``y`` ([..., hidden] -> [...])."""
    import torch

    x, y = x.float(), y.float()
    cos = torch.nn.functional.cosine_similarity(x, y, dim=-1, eps=1e-12)
    if metric == "bi":
        return 1.0 - cos
    return torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi


def _unit(x):
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class _LayerAccumulator:
    """Hooks for one scoring pass; holds the running sums of every layer.

    With ``blocks``, it also sums the angular distance between the input of every layer
    ``s`` and the output of every later layer (Gromov et al.'s block distance), keeping
    the current batch's unit-normalized block inputs until the batch ends.
    """

    def __init__(self, num_layers: int, metric: str, blocks: bool = False):
        self.metric = metric
        self.sums = [0.0] * num_layers
        self.counts = [0] * num_layers
        self.mask = None  # [batch, seq] bool of real tokens for the current batch
        self._inputs: dict[int, object] = {}
        self.blocks = blocks
        # block_sums[n - 1][s]: summed distance, input of s to output of s + n - 1
        self.block_sums = [[0.0] * (num_layers - n) for n in range(num_layers)]
        self._units: dict[int, object] = {}

    def pre_hook(self, index: int):
        def hook(module, args, kwargs):
            self._inputs[index] = args[0] if args else kwargs["hidden_states"]

        return hook

    def post_hook(self, index: int):
        def hook(module, args, kwargs, output):
            out = output[0] if isinstance(output, tuple) else output
            x = self._inputs.pop(index)
            values = token_metric(x, out, self.metric)
            self.sums[index] += float(values[self.mask].double().sum())
            self.counts[index] += int(self.mask.sum())
            if self.blocks:
                self._add_blocks(index, x, out)

        return hook

    def _add_blocks(self, index: int, x, out) -> None:
        import torch

        if index == 0:
            self._units.clear()
        self._units[index] = _unit(x)[self.mask]
        y = _unit(out)[self.mask]
        for start, xs in self._units.items():
            cos = (xs * y).sum(-1).clamp(-1.0, 1.0)
            dist = torch.arccos(cos) / math.pi
            self.block_sums[index - start][start] += float(dist.double().sum())

    def block_distances(self) -> list[list[float]]:
        """``[n - 1][s]``: mean angular distance from the input of s to the output of s+n-1."""
        count = self.counts[0]
        return [[v / count if count else float("nan") for v in row] for row in self.block_sums]

    def scores(self) -> list[float]:
        return [s / c if c else float("nan") for s, c in zip(self.sums, self.counts, strict=True)]


@dataclass
class LayerScores:
    """The contents of ``scores.json``."""

    metric: str
    num_layers: int
    scores: list[float]
    model: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    device: str = "cpu"
    seconds: float = 0.0
    # [n - 1][s]: mean angular distance between the input of layer s and the output of
    # layer s + n - 1 (Gromov et al. 2024); block selection picks the smallest of row n - 1
    block_distances: list[list[float]] | None = None

    def ranking(self) -> list[int]:
        """Layer indices from least to most influential."""
        return sorted(range(self.num_layers), key=lambda i: (self.scores[i], i))

    def save(self, path: Path) -> None:
        text = json.dumps(asdict(self), indent=2, allow_nan=False)  # strict JSON
        Path(path).write_text(text + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> LayerScores:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            scores = cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        except (OSError, ValueError, TypeError, RecursionError) as exc:
            raise ShortGPTError(f"cannot read scores file {path}: {exc}") from exc
        if len(scores.scores) != scores.num_layers:
            raise ShortGPTError(
                f"{path}: {len(scores.scores)} scores for {scores.num_layers} layers"
            )
        return scores


def check_batch_size(batch_size: int) -> None:
    """Refuse a batch size below 1 (the in-memory and the layer-by-layer scorers)."""
    if batch_size < 1:
        raise ShortGPTError(f"--batch-size {batch_size} must be at least 1")


def score_layers(
    model,
    spec,
    calib: CalibrationSet,
    *,
    metric: str = "bi",
    batch_size: int = 4,
    blocks: bool = False,
    progress: ProgressFactory = no_progress,
) -> list[float] | tuple[list[float], list[list[float]]]:
    """Mean per-token ``metric`` of each decoder layer of ``model`` over ``calib``.

    Runs the model's base (no LM head: the logits are not needed) once over the
    calibration windows with hooks on every decoder block. With ``blocks``, returns
    ``(scores, block_distances)`` from the same pass.
    """
    import torch

    if metric not in METRICS:
        raise ShortGPTError(f"unknown metric {metric!r}", hint=f"use one of: {', '.join(METRICS)}")
    check_batch_size(batch_size)
    layers = spec.decoder_layers(model)
    base = getattr(model, model.base_model_prefix, model)
    device = next(model.parameters()).device
    acc = _LayerAccumulator(len(layers), metric, blocks=blocks)
    handles = []
    for index, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(acc.pre_hook(index), with_kwargs=True))
        handles.append(layer.register_forward_hook(acc.post_hook(index), with_kwargs=True))
    n = calib.input_ids.shape[0]
    try:
        with torch.inference_mode(), progress("scoring layers", calib.tokens) as advance:
            for start in range(0, n, batch_size):
                ids = calib.input_ids[start : start + batch_size].to(device)
                mask = calib.attention_mask[start : start + batch_size].to(device)
                acc.mask = mask.bool()
                base(input_ids=ids, attention_mask=mask, use_cache=False)
                advance(int(mask.sum()))
    finally:
        for handle in handles:
            handle.remove()
    return (acc.scores(), acc.block_distances()) if blocks else acc.scores()


def score_model(
    loaded,
    calib: CalibrationSet,
    *,
    metric: str = "bi",
    batch_size: int = 4,
    blocks: bool = False,
    progress: ProgressFactory = no_progress,
) -> LayerScores:
    """Score every layer of a loaded model and package the result as ``scores.json`` data.

    The pass has no randomness (the seed only samples calibration windows, upstream)."""
    device = str(next(loaded.model.parameters()).device)
    return timed_scores(
        lambda: score_layers(
            loaded.model,
            loaded.source.spec,
            calib,
            metric=metric,
            batch_size=batch_size,
            blocks=blocks,
            progress=progress,
        ),
        source=loaded.source,
        calib=calib,
        device=device,
        metric=metric,
        blocks=blocks,
    )


def timed_scores(compute, *, source, calib, device: str, metric: str, blocks: bool):
    """Run ``compute`` (scores, or (scores, block distances) with ``blocks``) and package
    its result with the model, calibration, device and seconds as ``scores.json`` data."""
    began = time.perf_counter()
    values = compute()
    distances = None
    if blocks:
        values, distances = values
    seconds = time.perf_counter() - began
    log.info("scored %d layers on %d tokens in %.1f s", len(values), calib.tokens, seconds)
    return LayerScores(
        metric=metric,
        num_layers=len(values),
        scores=values,
        model=source.describe(),
        calibration=calib.describe(),
        device=device,
        seconds=round(seconds, 3),
        block_distances=distances,
    )
