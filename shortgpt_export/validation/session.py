"""Validation runs: the ``validate`` command and the main command's ``--validate``."""

from __future__ import annotations

import contextlib
import json
import shutil
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from ..default_model import cache_dir
from ..errors import QualityGateError
from ..progress import ProgressFactory, no_progress
from ..tokenizer_check import chat_stop_record
from .artifact_eval import ReportRow, check_tokenizer, evaluate_artifact, torch_record
from .evaluators import artifact_kind, torch_quant_label
from .layerwise_rows import layerwise_record
from .reference import EvalOptions, new_workdir, prepare


def artifact_facts(path: Path) -> tuple[int | None, str | None]:
    """(layers, quant label) read from a GGUF header or a folder's config."""
    kind = artifact_kind(path)
    if kind == "gguf":
        from ..gguf_file import gguf_info, open_gguf

        info = gguf_info(open_gguf(path))
        return info.block_count, info.file_type
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    quant = path.name.removeprefix("onnx-") if kind == "onnx" else None
    return config.get("num_hidden_layers"), quant


def parameter_bytes(model) -> int:
    """Bytes of a torch model's parameters (tied weights once): its fp32 size on disk."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def torch_row(model, tokenizer, evaluation, path: str, pruned: bool, layers: int) -> dict:
    """The report row of an in-memory torch model: the original or its pruned view."""
    label = "pruned" if pruned else "original"
    quant = torch_quant_label(model.dtype)
    row = ReportRow(path, label, "hf", quant, pruned, layers, parameter_bytes(model))
    return row.to_dict() | torch_record(model, tokenizer, evaluation, label)


def layerwise_row(evaluator, evaluation, path: str, pruned: bool) -> dict:
    """The report row of a model evaluated one layer at a time (layerwise_rows.py)."""
    label = "pruned" if pruned else "original"
    size, layers = evaluator.parameter_bytes(), len(evaluator.keep)
    quant = torch_quant_label(evaluator.dtype)
    row = ReportRow(path, label, "hf", quant, pruned, layers, size)
    return row.to_dict() | layerwise_record(evaluator, evaluation)


def measure_artifacts(
    loaded,
    entries: list[ReportRow],
    opts: EvalOptions,
    *,
    keep: list[int] | None = None,
    patches: dict | None = None,
    root: Path | None = None,
    progress: ProgressFactory = no_progress,
) -> dict:
    """Evaluate the reference model, its pruned view (``keep``) and every entry.

    Entry paths are taken relative to ``root`` when it is given. A model scored layer by
    layer (offload.StreamedModel, ``loaded.model`` None) is evaluated one layer at a time,
    its pruned view with the healed down projections ``patches`` (by original layer).
    """
    workdir = new_workdir()
    with ExitStack() as closing:
        closing.callback(shutil.rmtree, workdir, ignore_errors=True)
        evaluators = _LayerwiseEvaluators(loaded, opts, closing, progress)
        with progress("reference log-probabilities", None):
            evaluation = prepare(
                loaded,
                opts,
                cache_dir() / "reference",
                workdir,
                evaluators.original if loaded.model is None else None,
            )
        source = loaded.source
        paths = [(root / entry.path) if root else Path(entry.path) for entry in entries]
        with progress("checking the artifacts' tokenizers", None):
            for path in paths:  # a mismatch fails before any slow measurement
                check_tokenizer(path, evaluation)
        pruned = keep is not None and len(keep) < source.num_layers
        if loaded.model is None:
            original = evaluators.original(evaluation.windows)
            records = [layerwise_row(original, evaluation, str(source.path), False)]
            original.close()  # its states and LM head are not needed any more
            if pruned:
                with (
                    progress("pruned (torch, layer by layer)", None),
                    contextlib.closing(evaluators.pruned(keep, patches, evaluation.windows)) as ev,
                ):
                    records.append(layerwise_row(ev, evaluation, "(pruned view)", True))
        else:
            records = _torch_rows(loaded, evaluation, keep if pruned else None, progress)
        for entry, path in zip(entries, paths, strict=True):
            with progress(f"validating {path.name}", None):
                record = entry.to_dict() | evaluate_artifact(path, evaluation)
                if not entry.pruned and evaluation.truth is not None:
                    record["chat_stop"] = chat_stop_record(evaluation.truth, path)
                records.append(record)
        return {"eval": evaluation.describe(), "artifacts": records}


def _torch_rows(loaded, evaluation, keep: list[int] | None, progress) -> list[dict]:
    """The original model's row and (``keep``) its pruned view's, in memory."""
    from ..pruning import pruned_view

    source = loaded.source
    with progress("original (torch)", None):
        rows = [
            torch_row(
                loaded.model,
                loaded.tokenizer,
                evaluation,
                str(source.path),
                pruned=False,
                layers=source.num_layers,
            )
        ]
    if keep is not None:
        with (
            progress("pruned (torch)", None),
            pruned_view(loaded.model, source.spec, keep) as model,
        ):
            rows.append(
                torch_row(
                    model, loaded.tokenizer, evaluation, "(pruned view)", pruned=True,
                    layers=len(keep),
                )
            )  # fmt: skip
    return rows


class _LayerwiseEvaluators:
    """Layer-by-layer evaluators of a StreamedModel: the original one made once, for the
    reference log-probabilities and its own row (closed with ``closing``)."""

    def __init__(self, loaded, opts: EvalOptions, closing: ExitStack, progress):
        self.loaded, self.opts, self.closing, self.progress = loaded, opts, closing, progress
        self._original, self._windows = None, None

    def pruned(self, keep: list[int], patches: dict | None, windows):
        from .layerwise_rows import LayerwiseEvaluator

        return LayerwiseEvaluator(
            self.loaded, keep, windows, patches, threads=self.opts.threads,
            progress=self.progress,
        )  # fmt: skip

    def original(self, windows):
        """The original model's evaluator of ``windows`` (the evaluation's), made once."""
        if self._original is None:
            with self.progress("original (torch, layer by layer)", None):
                every = list(range(self.loaded.source.num_layers))
                evaluator = self.pruned(every, None, windows)
            self._original = self.closing.enter_context(contextlib.closing(evaluator))
            self._windows = windows
        elif not np.array_equal(windows, self._windows):
            raise ValueError("the original model's evaluator was made for other windows")
        return self._original


def check_quality_gate(report: dict, max_increase: float | None) -> None:
    """Raise when a pruned artifact's perplexity exceeds ``max_increase`` x the original's."""
    if max_increase is None:
        return
    arts = report["artifacts"]
    originals = {a["quant"]: a for a in arts if not a["pruned"]}
    fallback = next(a for a in arts if a["label"] == "original")
    failures = []
    for art in (a for a in arts if a["pruned"]):
        base = originals.get(art["quant"], fallback)
        ratio = art["perplexity"] / base["perplexity"]
        if ratio > max_increase:
            failures.append(
                f"{Path(art['path']).name} ({art['quant']}): perplexity "
                f"{art['perplexity']:.1f} is {ratio:.2f}x the original's "
                f"{base['perplexity']:.1f}"
            )
    if failures:
        raise QualityGateError(
            "; ".join(failures) + f" (limit {max_increase}x)",
            hint="remove fewer layers, or raise --max-ppl-increase if this loss is acceptable",
        )


def validate_artifacts(
    loaded, paths: list[Path], opts: EvalOptions, *, progress: ProgressFactory = no_progress
) -> dict:
    """Report on any mix of GGUF files, ONNX folders and HF folders against ``loaded``."""
    entries = []
    for path in paths:
        layers, quant = artifact_facts(path)
        pruned = layers is not None and layers < loaded.source.num_layers
        entries.append(
            ReportRow.of_path(path, label=path.name, pruned=pruned, layers=layers, quant=quant)
        )
    return measure_artifacts(loaded, entries, opts, progress=progress)
