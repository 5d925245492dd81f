"""What every artifact is measured against: the evaluation windows, tokenized once with the
reference model's tokenizer, and the reference (original, unpruned) model's log-probs,
cached on disk keyed by the model's resolved path, the size and mtime of its weight files,
its dtype and the evaluation tokens.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..code_identity import code_identity
from ..errors import ShortGPTError, ValidationError
from ..tokenizer_check import PLAIN_TEXTS, source_fingerprint
from .evaluators import TorchEvaluator


@dataclass
class EvalOptions:
    eval: str | None = None  # text file or dataset name; None: data/evaluation.txt
    ctx: int = 512
    max_tokens: int = 4096
    kl_windows: int = 2  # windows whose full distributions are compared (cached on disk)
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    prompt_tokens: int = 128
    gen_tokens: int = 32
    reps: int = 3  # timed latency runs after a warm-up (--latency-runs); median reported
    devices: str = "auto"  # auto: CPU plus every accelerator found; cpu: CPU only
    qa: int | None = 20  # built-in QA questions per artifact: None all, 0 none


def evaluation_windows(tokenizer, opts: EvalOptions, max_context: int | None):
    """The evaluation text as [n, ctx] token ids, tokenized once; raises on bad sizes."""
    from ..calibration import read_evaluation_text
    from ..evaluation import eval_windows as cut

    if max_context is not None and opts.ctx > max_context:
        raise ValidationError(
            f"--ctx {opts.ctx} is larger than the model's context of {max_context} tokens",
            hint=f"use --ctx {max_context} or less",
        )
    texts, source = read_evaluation_text(opts.eval)
    try:
        windows = cut(tokenizer, "\n\n".join(texts), ctx=opts.ctx, max_tokens=opts.max_tokens)
    except ShortGPTError as exc:
        raise ValidationError(f"evaluation text {source}: {exc.message}", hint=exc.hint) from exc
    return windows.numpy(), source


def reference_logprobs(evaluator, windows: np.ndarray, kl_windows: int, cache_dir: Path, key: str):
    """Float32 [kl_windows * ctx, vocab] log-probs of the reference, cached under ``key``.

    Computed by the evaluator of the original model's torch row (``evaluator()`` returns
    it), so the reference measured against itself gives KL 0 and top-1 agreement 1 (to
    rounding when the in-memory and the layer-by-layer evaluator share a cached entry).
    """
    path = cache_dir / f"reference-{key}.npy"
    if path.is_file():
        return path
    original = evaluator()
    rows = [original.logprobs(window).float().numpy() for window in windows[:kl_windows]]
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp.npy")
    np.save(partial, np.concatenate(rows))
    os.replace(partial, path)
    return path


WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".ckpt")


def model_fingerprint(source, dtype) -> str:
    """What identifies the reference's log-probs: the resolved path, the size and mtime of
    every weight and config file, the dtype the model runs in, and the code that runs it
    (:func:`code_identity.code_identity`: a reference cached before a loading fix in this
    package gave the original model KL 0.14 against itself)."""
    path = Path(source.path).resolve()
    files = (
        [path]
        if path.is_file()
        else sorted(
            p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES or p.name == "config.json"
        )
    )
    parts = [str(path), str(dtype), code_identity()]
    for file in files:
        stat = file.stat()
        parts.append(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return "\n".join(parts)


def cache_key(model_ref: str, windows: np.ndarray, kl_windows: int) -> str:
    """The reference log-probs' cache key: the model, and the token ids with their window
    shape (the same tokens cut into other windows see other contexts)."""
    digest = hashlib.sha256(model_ref.encode())
    compared = np.ascontiguousarray(windows[:kl_windows])
    digest.update(f"{compared.shape}:{compared.dtype}".encode())
    digest.update(compared.tobytes())
    return digest.hexdigest()[:16]


@dataclass
class Evaluation:
    """What every artifact is measured against: token windows and the cached reference."""

    windows: np.ndarray
    source: str
    reference_path: Path
    reference_ids: dict
    opts: EvalOptions
    n_ctx: int
    workdir: Path
    truth: dict | None = None  # the source's tokenizer fingerprint (tokenizer_check)

    def describe(self) -> dict:
        return {
            "source": self.source,
            "tokens": int(self.windows.size),
            "ctx": self.opts.ctx,
            "kl_tokens": int(self.windows[: self.opts.kl_windows].size),
            "latency_runs": self.opts.reps,
            "devices": self.opts.devices,
            # the main command's --validate fills these in; `validate` cannot know them
            "calibration": None,
            "in_sample": None,
        }


def prepare(loaded, opts: EvalOptions, cache_dir: Path, workdir: Path, original=None) -> Evaluation:
    """Tokenize the evaluation text and compute (or reuse) the reference log-probs.

    ``original(windows)``: the evaluator of the original model for those windows (by
    default a TorchEvaluator of ``loaded.model``)."""
    if opts.qa is not None and opts.qa < 0:
        raise ValidationError(
            f"--qa {opts.qa} is negative",
            hint="pass the number of built-in questions to ask, or 0 to skip the QA check",
        )
    model = loaded.model
    config = loaded.source.config if model is None else model.config
    max_context = getattr(config, "max_position_embeddings", None)
    windows, source = evaluation_windows(loaded.tokenizer, opts, max_context)
    dtype = loaded.dtype if model is None else getattr(model, "dtype", None)
    key = cache_key(model_fingerprint(loaded.source, dtype), windows, opts.kl_windows)
    if original is None:

        def original(_windows):
            return TorchEvaluator(Path("reference"), opts.threads, model=model, tokenizer=object())

    reference = reference_logprobs(
        lambda: original(windows), windows, opts.kl_windows, cache_dir, key
    )
    ids = {t: loaded.tokenizer(t, add_special_tokens=False)["input_ids"] for t in PLAIN_TEXTS}
    np.save(workdir / "windows.npy", windows)
    return Evaluation(
        windows=windows,
        source=source,
        reference_path=reference,
        reference_ids=ids,
        opts=opts,
        n_ctx=max(opts.ctx, opts.prompt_tokens + opts.gen_tokens) + 8,
        workdir=workdir,
        truth=source_fingerprint(loaded.source),
    )


def new_workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="shortgpt-validate-"))
