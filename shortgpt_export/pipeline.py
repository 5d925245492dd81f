"""The stages put together: one library function per CLI command."""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .artifacts import Artifact
from .calibration import check_calibration_source, load_calibration, same_text
from .errors import NonFiniteScoreError, PlanError, ShortGPTError
from .export_options import ExportOptions
from .healing import DEFAULT_HEAL, PATCH_FILE, save_patches
from .output import check_no_overlap, check_writable, staged_output
from .planning import Plan, make_plan
from .progress import ProgressFactory, no_progress
from .pruning import healed
from .recipe import DEFAULT_SELECT_TOKENS, Recipe, choose, split_calibration
from .scoring import LayerScores, score_model
from .selection import block_plan
from .source import (
    HUB_ID,
    LoadedModel,
    ModelSource,
    load_model,
    pick_device,
    resolve_source,
)

log = logging.getLogger(__name__)


@dataclass
class ModelOptions:
    """How to find and load the model."""

    model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    allow_pickle: bool = False


@dataclass
class ScoreOptions:
    """How to calibrate and score."""

    calib: str | None = None
    calib_tokens: int = 8192
    seq_len: int = 256
    batch_size: int = 4
    seed: int = 0
    metric: str = "bi"
    offload: str = "auto"  # auto | none | layers (offload.py: score one layer at a time)


@dataclass
class PlanOptions:
    remove: int | None = None
    ratio: float | None = None
    layers: list[int] | None = None
    select: str = "score"  # score | greedy | block (selection.py)
    heal: str = DEFAULT_HEAL  # none | linear (healing.py)
    auto: bool = False  # --remove auto / --ratio auto: the most layers within the budget
    select_tokens: int = DEFAULT_SELECT_TOKENS  # calibration tokens greedy selection uses
    greedy_candidates: int | None = None  # greedy tries only this many lowest-scored layers

    def recipe(self, max_ppl_increase: float | None, batch_size: int) -> Recipe:
        return Recipe(
            select=self.select,
            heal=self.heal,
            auto=self.auto,
            max_ppl_increase=max_ppl_increase,
            select_tokens=self.select_tokens,
            greedy_candidates=self.greedy_candidates,
            batch_size=batch_size,
        )


@dataclass
class RunResult:
    out: Path
    scores: LayerScores | None
    plan: Plan
    artifacts: list[Artifact] = field(default_factory=list)
    report: dict | None = None

    def summary(self) -> dict:
        return {
            "out": str(self.out),
            "scores": self.scores.scores if self.scores else None,
            "metric": self.plan.metric,
            "num_layers": self.plan.num_layers,
            "remove": self.plan.remove,
            "keep": self.plan.keep,
            "strategy": self.plan.strategy,
            "heal": self.plan.heal,
            "budget": self.plan.budget,
            "artifacts": [a.to_dict() for a in self.artifacts],
            "report": self.report,
        }


def default_out_dir(source: ModelSource) -> Path:
    """``<name>-shortgpt`` in the current folder; a hub id gives its repository name."""
    name = source.name
    if HUB_ID.match(source.ref or "") and not Path(source.ref).expanduser().exists():
        name = re.sub(r"[^\w.-]+", "-", source.ref.split("/")[-1]) or name
    return Path(f"{name}-shortgpt")


MAX_LAYERS = 100_000  # more in a config is a crafted or broken file


def _model_inputs(source: ModelSource) -> list[tuple[str, Path]]:
    return [("model", source.path)]


def _check_score_options(opts: ScoreOptions) -> None:
    """Counts that must be positive, checked before anything is loaded."""
    for flag, value, least in (
        ("--calib-tokens", opts.calib_tokens, 1),
        ("--seq-len", opts.seq_len, 2),
        ("--batch-size", opts.batch_size, 1),
    ):
        if not isinstance(value, int) or value < least:
            raise ShortGPTError(f"{flag} {value} must be at least {least}")


def _check_layer_count(source: ModelSource) -> None:
    try:
        layers = source.num_layers
    except (TypeError, ValueError, OverflowError):
        layers = None
    if layers is None or not 2 <= layers <= MAX_LAYERS:
        key = source.spec.num_layers_key
        raise PlanError(
            f"{source.ref} declares {key} = {getattr(source.config, key, None)!r}; "
            "layer pruning needs at least 2 decoder layers",
            hint="pass a model with 2 or more layers",
        )


def preflight(
    out: Path,
    force: bool,
    inputs: list[tuple[str, Path | str | None]],
    score_opts: ScoreOptions | None = None,
) -> None:
    """Everything that can be checked before the model is loaded: the output does not
    overlap any input and can be written, the calibration file is usable, counts are sane."""
    check_no_overlap(out, inputs)
    check_writable(out, force)
    if score_opts is not None:
        _check_score_options(score_opts)
        check_calibration_source(score_opts.calib, score_opts.calib_tokens)


def check_finite_scores(scores: LayerScores, dtype: str | None = None) -> None:
    """Stop when a layer's score is NaN or infinite: no ranking of the layers can be trusted."""
    bad = [i for i, s in enumerate(scores.scores) if not math.isfinite(s)]
    if bad:
        shown = ", ".join(f"{i}={scores.scores[i]}" for i in bad[:8])
        raise NonFiniteScoreError(
            f"layer scores are not finite ({shown}); the hidden states overflowed or the "
            f"weights hold NaN/inf" + (f" (scored in {dtype})" if dtype else ""),
            hint="score in float32 (--dtype float32) and check the weights",
        )


def _load(
    source: ModelSource, opts: ModelOptions, progress: ProgressFactory, offload: str = "none"
):
    """The model in memory, or (offload) a StreamedModel scored one layer at a time."""
    device = pick_device(opts.device)
    if offload != "none":
        from .offload import StreamedModel, choose_offload, load_tokenizer
        from .source import pick_dtype

        dtype = pick_dtype(device, opts.dtype)
        if choose_offload(offload, source, device, dtype):
            with progress(f"loading the tokenizer of {source.ref} (layer by layer)", None):
                tokenizer = load_tokenizer(source, opts.trust_remote_code)
            return StreamedModel(source, tokenizer, device, dtype)
    with progress(f"loading {source.ref} on {device}", None):
        return load_model(
            source, device=device, dtype=opts.dtype, trust_remote_code=opts.trust_remote_code
        )


def _after_streamed_scoring(streamed, source, model_opts, export, progress):
    """After layer-by-layer scoring: the whole model if an export format converts from
    memory (none of the registered ones does for a source that streams: safetensors and
    GGUF folders are written tensor by tensor); selection (streamed_greedy.py), healing
    (streamed_healing.py), the ``--remove auto`` budget, export verification
    (offload.stream_mean_loss, stream_logprobs) and validation's torch rows
    (validation/layerwise_rows.py) stream."""
    if not export.converts_from_memory(source):
        return streamed
    log.warning(
        "scored layer by layer, but export from memory needs the whole model: loading it now"
    )
    return _load(source, model_opts, progress)


def _check_plan_request(num_layers: int, plan_opts: PlanOptions) -> None:
    """Fail on an impossible request before the (slow) scoring, not after it."""
    if plan_opts.auto:
        if plan_opts.remove is not None or plan_opts.ratio is not None or plan_opts.layers:
            raise PlanError("--remove auto / --ratio auto goes without other layer counts")
        return
    make_plan(
        num_layers,
        [0.0] * num_layers,
        remove=plan_opts.remove,
        ratio=plan_opts.ratio,
        layers=plan_opts.layers,
    )


def _score(
    loaded: LoadedModel,
    opts: ScoreOptions,
    progress: ProgressFactory,
    *,
    blocks: bool = False,
    holdout: bool = False,
):
    """Scores (on the calibration windows not held out), and (fit windows, held-out)."""
    with progress("reading calibration text", None):
        calib = load_calibration(
            loaded.tokenizer,
            opts.calib,
            seq_len=opts.seq_len,
            max_tokens=opts.calib_tokens,
            seed=opts.seed,
        )
    fit, held_out = split_calibration(calib, holdout)
    scorer = score_model
    if loaded.model is None:  # offload.StreamedModel
        from .offload import score_streamed as scorer
    scores = scorer(
        loaded,
        fit,
        metric=opts.metric,
        batch_size=opts.batch_size,
        blocks=blocks,
        progress=progress,
    )
    return scores, fit, held_out


def _patch_dtype(source: ModelSource):
    """Healed weights are stored in the checkpoint's own dtype (F32 for GGUF sources)."""
    import torch

    if source.kind != "hf":
        return torch.float32
    from .safetensors_io import TORCH_DTYPES

    some = next(
        (r for name, r in source.tensors().items() if source.spec.layer_of(name) == 0),
        None,
    )
    return getattr(torch, TORCH_DTYPES.get(some.dtype, "float32")) if some else torch.float32


def _baseline_and_validate(
    export: ExportOptions,
    source: ModelSource,
    plan: Plan,
    stage: Path,
    loaded: LoadedModel,
    artifacts: list[Artifact],
    scores: LayerScores,
    eval_opts,
    progress: ProgressFactory,
    *,
    in_sample: bool,
) -> dict:
    """Export the unpruned model at the same types into baseline/, then measure all;
    ``in_sample``: the evaluation text is the calibration text (recorded in the report)."""
    from .report import write_report
    from .validation.artifact_eval import ReportRow
    from .validation.session import measure_artifacts

    identity = Plan.removing(
        plan.num_layers,
        [],
        metric=plan.metric,
        reason="original, nothing removed",
    )
    quantized = [name for name in export.formats if name != "hf"]
    baseline = (
        _export(
            export.but(formats=quantized, verify=False),
            source,
            identity,
            stage / "baseline",
            loaded,
            None,
            progress,
        )
        if quantized
        else []
    )
    entries = [ReportRow.of_artifact(a, "baseline/", pruned=False) for a in baseline] + [
        ReportRow.of_artifact(a, "", pruned=True) for a in artifacts if a.format != "hf"
    ]
    report = measure_artifacts(
        loaded,
        entries,
        eval_opts,
        keep=plan.keep,
        patches=plan.patch_weights(source.spec) if loaded.model is None else None,
        root=stage,
        progress=progress,
    )
    report["eval"]["calibration"] = scores.calibration.get("source")
    report["eval"]["in_sample"] = in_sample
    write_report(report, stage, scores=scores.__dict__, removed=plan.remove)
    return report


def _export(
    export: ExportOptions,
    source: ModelSource,
    plan: Plan,
    stage: Path,
    loaded: LoadedModel | None,
    calibration: dict | None,
    progress: ProgressFactory,
) -> list[Artifact]:
    from .converters import ExportContext

    ctx = ExportContext(
        source=source,
        plan=plan,
        out_dir=stage,
        loaded=loaded,
        calibration=calibration,
        options=export,
        progress=progress,
    )
    stage.mkdir(parents=True, exist_ok=True)
    artifacts: list[Artifact] = []
    for backend in export.backends():
        artifacts.extend(backend.export(ctx))
    return artifacts


def run(
    model_opts: ModelOptions,
    score_opts: ScoreOptions,
    plan_opts: PlanOptions,
    *,
    out: Path | None = None,
    export: ExportOptions | None = None,
    dry_run: bool = False,
    force: bool = False,
    validate=None,
    max_ppl_increase: float | None = None,
    progress: ProgressFactory = no_progress,
) -> RunResult:
    """load -> score -> plan -> export (-> validate), into ``out`` (all or nothing).

    ``validate`` (EvalOptions) also exports the unpruned model at the same types into
    ``out/baseline`` and writes the stacking report; ``max_ppl_increase`` then fails the
    run (after writing everything) when a pruned artifact lost more than that factor.
    ``export`` defaults to a Hugging Face folder.
    """
    export = export or ExportOptions()
    source = resolve_source(
        model_opts.model,
        trust_remote_code=model_opts.trust_remote_code,
        allow_pickle=model_opts.allow_pickle,
    )
    out = Path(out) if out else default_out_dir(source)
    eval_file = getattr(validate, "eval", None) if validate is not None else None
    preflight(
        out,
        force,
        [*_model_inputs(source), ("calibration file", score_opts.calib), ("eval file", eval_file)],
        score_opts,
    )
    in_sample = False
    if validate is not None:
        check_calibration_source(validate.eval, validate.max_tokens, "evaluation")
        in_sample = same_text(score_opts.calib, validate.eval)
        if in_sample:
            log.warning(
                "--eval %s is also the calibration text: the layers are chosen (and healed) "
                "on it, so the report's perplexity and KL are in-sample and flatter the "
                "pruned model; pass a held-out text with --eval",
                validate.eval,
            )
    _check_layer_count(source)
    _check_plan_request(source.num_layers, plan_opts)
    export.check(source)
    recipe = plan_opts.recipe(max_ppl_increase, score_opts.batch_size)
    recipe.check(source.spec)
    loaded = _load(source, model_opts, progress, score_opts.offload)
    scores, calib, held_out = _score(
        loaded,
        score_opts,
        progress,
        blocks=plan_opts.select == "block",
        holdout=plan_opts.auto,
    )
    if loaded.model is None and not dry_run:
        loaded = _after_streamed_scoring(loaded, source, model_opts, export, progress)
    check_finite_scores(scores, str(getattr(loaded.model, "dtype", "")) or None)
    choice = choose(
        loaded,
        calib,
        scores,
        recipe,
        remove=plan_opts.remove,
        ratio=plan_opts.ratio,
        layers=plan_opts.layers,
        held_out=held_out,
        progress=progress,
    )
    plan = choice.plan
    if not plan.remove:
        log.warning("the plan removes no layer: the output is the unpruned model")
    artifacts: list[Artifact] = []
    report = None
    with staged_output(out, force=force) as stage:
        weights = None
        if choice.heal is not None:
            plan.heal = choice.heal.describe()
            if choice.heal.weights:
                save_patches(
                    stage / PATCH_FILE, source.spec, choice.heal.weights, _patch_dtype(source)
                )
                plan.patch_file, plan.root = PATCH_FILE, str(stage)
                weights = plan.patch_weights(source.spec)
        plan.save(stage / "plan.json")
        if plan.budget:
            from .report import budget_plot

            budget_plot(plan.budget, stage / "budget.png")
        if not dry_run:
            scores.save(stage / "scores.json")
            with healed(loaded.model, plan.keep, weights):
                artifacts = _export(
                    export, source, plan, stage, loaded, scores.calibration, progress
                )
                if validate is not None:
                    report = _baseline_and_validate(
                        export,
                        source,
                        plan,
                        stage,
                        loaded,
                        artifacts,
                        scores,
                        validate,
                        progress,
                        in_sample=in_sample,
                    )
    result = RunResult(out=out, scores=scores, plan=plan, artifacts=artifacts, report=report)
    if validate is not None:
        from .validation.session import check_quality_gate

        check_quality_gate(report, max_ppl_increase)
    return result


def _write_file_atomically(path: Path, text: str, force: bool) -> None:
    check_writable(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def score(
    model_opts: ModelOptions,
    score_opts: ScoreOptions,
    *,
    out: Path | None = None,
    force: bool = False,
    progress: ProgressFactory = no_progress,
) -> tuple[LayerScores, Path]:
    """Score every layer and write ``<out>/scores.json``; returns the scores and the path."""
    source = resolve_source(
        model_opts.model,
        trust_remote_code=model_opts.trust_remote_code,
        allow_pickle=model_opts.allow_pickle,
    )
    folder = Path(out or default_out_dir(source))
    path = folder / "scores.json"
    check_no_overlap(
        folder, [*_model_inputs(source), ("calibration file", score_opts.calib)], replaced=False
    )
    check_writable(path, force)
    _check_score_options(score_opts)
    check_calibration_source(score_opts.calib, score_opts.calib_tokens)
    _check_layer_count(source)
    loaded = _load(source, model_opts, progress, score_opts.offload)
    scores = _score(loaded, score_opts, progress, blocks=True)[0]
    check_finite_scores(scores, str(getattr(loaded.model, "dtype", "")) or None)
    text = json.dumps(scores.__dict__, indent=2, allow_nan=False) + "\n"
    _write_file_atomically(path, text, force)
    return scores, path


PLAN_ONLY_STRATEGIES = ("score", "block")  # the selections that need no model


def plan_from_scores(
    scores_path: Path,
    *,
    remove: int | None = None,
    ratio: float | None = None,
    layers: list[int] | None = None,
    select: str = "score",
    out: Path | None = None,
    force: bool = False,
) -> tuple[Plan, Path]:
    """Choose layers from a ``scores.json`` alone and write ``<out>/plan.json``."""
    scores = LayerScores.load(scores_path)
    folder = Path(out) if out else Path(scores_path).parent
    path = folder / "plan.json"
    check_writable(path, force)
    if select == "block":
        if layers is not None or not scores.block_distances:
            raise PlanError(
                "--select block needs a layer count and the block distances of scores.json"
                + ("" if scores.block_distances else f" ({scores_path} has none)"),
                hint="pass --remove N (or --ratio) with a scores.json from `shortgpt-export score`",
            )
        n = remove
        if n is None:  # the count --ratio (or the default ratio) gives
            n = len(make_plan(scores.num_layers, scores.scores, ratio=ratio).remove)
        plan = block_plan(scores.num_layers, scores.block_distances, n, scores.scores)
    elif select == "score":
        plan = make_plan(
            scores.num_layers,
            scores.scores,
            remove=remove,
            ratio=ratio,
            layers=layers,
            metric=scores.metric,
        )
    else:
        raise PlanError(
            f"--select {select} needs the model",
            hint=f"use one of {', '.join(PLAN_ONLY_STRATEGIES)} here, or the main command",
        )
    folder.mkdir(parents=True, exist_ok=True)
    _write_file_atomically(path, plan.to_json(), force)
    return plan, path


def prune(
    model_opts: ModelOptions,
    plan_path: Path,
    *,
    out: Path | None = None,
    export: ExportOptions | None = None,
    force: bool = False,
    progress: ProgressFactory = no_progress,
) -> RunResult:
    """Apply an existing ``plan.json`` to the model and export it into ``out``."""
    export = export or ExportOptions()
    plan = Plan.load(plan_path)
    source = resolve_source(
        model_opts.model,
        trust_remote_code=model_opts.trust_remote_code,
        allow_pickle=model_opts.allow_pickle,
    )
    if plan.num_layers != source.num_layers:
        raise PlanError(
            f"{plan_path} is for a {plan.num_layers}-layer model but {source.ref} has "
            f"{source.num_layers} layers",
            hint="use the plan.json made for this model",
        )
    out = Path(out) if out else default_out_dir(source)
    preflight(out, force, [*_model_inputs(source), ("plan", plan_path)])
    _check_layer_count(source)
    if not plan.remove:
        log.warning("%s removes no layer: the output is the unpruned model", plan_path)
    export.check(source)
    loaded = _load(source, model_opts, progress) if export.needs_model(source) else None
    weights = plan.patch_weights(source.spec)
    with staged_output(out, force=force) as stage:
        if weights:
            import shutil

            shutil.copy2(plan.patch_path(), stage / PATCH_FILE)
            plan.patch_file, plan.root = PATCH_FILE, str(stage)
        plan.save(stage / "plan.json")
        with healed(loaded.model if loaded else None, plan.keep, weights):
            artifacts = _export(export, source, plan, stage, loaded, None, progress)
    return RunResult(out=out, scores=None, plan=plan, artifacts=artifacts)


def validate(
    model_opts: ModelOptions,
    paths: list[Path],
    eval_opts,
    *,
    out: Path,
    force: bool = False,
    max_ppl_increase: float | None = None,
    offload: str = "auto",
    progress: ProgressFactory = no_progress,
) -> dict:
    """Measure artifacts against the reference model and write the report into ``out``;
    ``offload`` as ScoreOptions.offload (layers: the reference's torch row one decoder
    layer at a time)."""
    from .report import write_report
    from .validation.evaluators import artifact_kind
    from .validation.session import check_quality_gate, validate_artifacts

    paths = [Path(p) for p in paths]
    for path in paths:
        if not path.exists():
            from .errors import ModelNotFoundError

            raise ModelNotFoundError(
                f"artifact {path} does not exist",
                hint="pass files and folders written by shortgpt-export",
            )
        artifact_kind(path)
    source = resolve_source(
        model_opts.model,
        trust_remote_code=model_opts.trust_remote_code,
        allow_pickle=model_opts.allow_pickle,
    )
    inputs = [("artifact", path) for path in paths]
    inputs += [*_model_inputs(source), ("eval file", eval_opts.eval)]
    preflight(Path(out), force, inputs)
    check_calibration_source(eval_opts.eval, eval_opts.max_tokens, "evaluation")
    loaded = _load(source, model_opts, progress, offload)
    with staged_output(Path(out), force=force) as stage:
        report = validate_artifacts(loaded, paths, eval_opts, progress=progress)
        write_report(report, stage)
    check_quality_gate(report, max_ppl_increase)
    return report


__all__ = [
    "ModelOptions",
    "ScoreOptions",
    "PlanOptions",
    "RunResult",
    "run",
    "score",
    "prune",
    "ShortGPTError",
]
