"""Evaluate one artifact: in a worker process (GGUF, ONNX, HF folders) or in this process
(the in-memory torch reference and its pruned view)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..artifacts import path_size
from ..errors import ValidationError
from ..tokenizer_check import artifact_fingerprint, mismatch
from .evaluators import TorchEvaluator, artifact_kind
from .reference import Evaluation

log = logging.getLogger(__name__)


def worker_job(path: Path, evaluation: Evaluation) -> dict:
    """What the worker process needs to evaluate ``path`` (see ``worker.evaluate``)."""
    from .devices import accelerators

    opts = evaluation.opts
    devices = accelerators(artifact_kind(path)) if opts.devices == "auto" else []
    if devices:
        log.info("%s: latency on CPU and on %s", path.name, ", ".join(devices))
    return {
        "artifact": str(path),
        "devices": devices,
        "windows": str(evaluation.workdir / "windows.npy"),
        "reference": str(evaluation.reference_path),
        "reference_ids": evaluation.reference_ids,
        "threads": opts.threads,
        "n_ctx": evaluation.n_ctx,
        "kl_windows": opts.kl_windows,
        "prompt_tokens": opts.prompt_tokens,
        "gen_tokens": opts.gen_tokens,
        "reps": opts.reps,
        "qa": opts.qa,
    }


def check_tokenizer(path: Path, evaluation: Evaluation) -> None:
    """Raise ValidationError when ``path`` tokenizes (plain text, special tokens, chat)
    differently from the reference; llama.cpp runs in a subprocess."""
    if evaluation.truth is None:
        return
    why = mismatch(evaluation.truth, artifact_fingerprint(path))
    if why:
        raise ValidationError(
            f"the tokenizer of {path} works differently from the reference's: {why}",
            hint="validate artifacts against the model they were made from (--reference)",
        )


def evaluate_artifact(path: Path, evaluation: Evaluation) -> dict:
    """Run one artifact in a worker process; raises ValidationError on its failure.
    Check its tokenizer first (``check_tokenizer``)."""
    job = worker_job(path, evaluation)
    job_file = evaluation.workdir / "job.json"
    job_file.write_text(json.dumps(job))
    result = subprocess.run(
        [sys.executable, "-m", "shortgpt_export.validation.worker", str(job_file)],
        capture_output=True,
        text=True,
    )
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise ValidationError(f"evaluating {path} failed: {tail}")
    record = json.loads(lines[-1])
    if "error" in record:
        raise ValidationError(
            record["error"],
            hint="validate artifacts against the model they were made from (--reference)",
        )
    return record


def torch_record(model, tokenizer, evaluation: Evaluation, label_path: str) -> dict:
    """The same measurements for an in-memory torch model (the reference or a pruned view).

    These run inside the pipeline's own process, so they get no memory figures.
    """
    from .measure import latency, provenance, quality
    from .qa import qa_record

    opts = evaluation.opts
    evaluator = TorchEvaluator(Path(label_path), opts.threads, model=model, tokenizer=tokenizer)
    reference = np.load(evaluation.reference_path, mmap_mode="r")
    return {
        **quality(evaluator, evaluation.windows, reference, opts.kl_windows),
        **latency(
            evaluator,
            evaluation.windows,
            prompt_tokens=opts.prompt_tokens,
            gen_tokens=opts.gen_tokens,
            reps=opts.reps,
        ),
        "peak_rss_bytes": None,
        "rss_growth_bytes": None,
        **provenance(evaluator),
        "accelerators": [],
        **qa_record(evaluator, opts.qa),
    }


@dataclass
class ReportRow:
    """What identifies one row of the validation report; its measurements are added to
    ``to_dict()`` (artifact_eval.evaluate_artifact, torch_record)."""

    path: str
    label: str  # "original", "pruned", or a file name (the validate command)
    format: str  # hf | gguf | onnx
    quant: str | None
    pruned: bool
    layers: int | None
    size_bytes: int | None

    @classmethod
    def of_path(cls, path: Path, *, label: str, pruned: bool, layers, quant) -> ReportRow:
        """The row of an artifact on disk, its size measured."""
        return cls(str(path), label, artifact_kind(path), quant, pruned, layers, path_size(path))

    @classmethod
    def of_artifact(cls, art, folder: str, *, pruned: bool) -> ReportRow:
        """The row of an exported Artifact, its path relative to the output folder."""
        label = "pruned" if pruned else "original"
        return cls(
            folder + art.path, label, art.format, art.quant, pruned, art.layers, art.size_bytes
        )

    def to_dict(self) -> dict:
        return asdict(self)
