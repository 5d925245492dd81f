"""Validation runs: the ``validate`` command and the main command's ``--validate``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..default_model import cache_dir
from ..errors import QualityGateError
from ..progress import ProgressFactory, no_progress
from ..tokenizer_check import chat_stop_record
from .artifact_eval import ReportRow, check_tokenizer, evaluate_artifact, torch_record
from .evaluators import artifact_kind
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
    row = ReportRow(path, label, "hf", "torch fp32", pruned, layers, parameter_bytes(model))
    return row.to_dict() | torch_record(model, tokenizer, evaluation, label)


def measure_artifacts(
    loaded,
    entries: list[ReportRow],
    opts: EvalOptions,
    *,
    keep: list[int] | None = None,
    root: Path | None = None,
    progress: ProgressFactory = no_progress,
) -> dict:
    """Evaluate the reference model, its pruned view (``keep``) and every entry.

    Entry paths are taken relative to ``root`` when it is given.
    """
    from ..pruning import pruned_view

    workdir = new_workdir()
    try:
        with progress("reference log-probabilities", None):
            evaluation = prepare(loaded, opts, cache_dir() / "reference", workdir)
        source = loaded.source
        paths = [(root / entry.path) if root else Path(entry.path) for entry in entries]
        with progress("checking the artifacts' tokenizers", None):
            for path in paths:  # a mismatch fails before any slow measurement
                check_tokenizer(path, evaluation)
        records = []
        with progress("original (torch)", None):
            records.append(
                torch_row(
                    loaded.model,
                    loaded.tokenizer,
                    evaluation,
                    str(source.path),
                    pruned=False,
                    layers=source.num_layers,
                )
            )
        if keep is not None and len(keep) < source.num_layers:
            with (
                progress("pruned (torch)", None),
                pruned_view(loaded.model, source.spec, keep) as model,
            ):
                records.append(
                    torch_row(
                        model,
                        loaded.tokenizer,
                        evaluation,
                        "(pruned view)",
                        pruned=True,
                        layers=len(keep),
                    )
                )
        for entry, path in zip(entries, paths, strict=True):
            with progress(f"validating {path.name}", None):
                record = entry.to_dict() | evaluate_artifact(path, evaluation)
                if not entry.pruned and evaluation.truth is not None:
                    record["chat_stop"] = chat_stop_record(evaluation.truth, path)
                records.append(record)
        return {"eval": evaluation.describe(), "artifacts": records}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


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
