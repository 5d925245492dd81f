"""Calibration and evaluation text: read it, tokenize it once, cut it into windows.

Each text a user can name without a file (the built-in one, a dataset) comes in two
disjoint parts, one for calibration (``--calib``: scoring, selection, healing) and one for
evaluation (``--eval``), so that nothing is evaluated on the text it was calibrated on."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import CalibrationError

log = logging.getLogger(__name__)

# use -> (package file, source label); two different texts, written for this project (CC0)
BUILTIN_TEXTS = {
    "calibration": ("data/calibration.txt", "builtin:mixed-v1"),
    "evaluation": ("data/evaluation.txt", "builtin:eval-v1"),
}
DEFAULT_SOURCE = BUILTIN_TEXTS["calibration"][1]
FLAGS = {"calibration": "--calib", "evaluation": "--eval"}


@dataclass(frozen=True)
class NamedDataset:
    """A dataset ``--calib``/``--eval`` can name: ``datasets.load_dataset`` arguments, and
    the keyword arguments (split or files) that each use reads; the two never overlap."""

    args: tuple
    calibration: dict
    evaluation: dict
    field: str = "text"

    def part(self, use: str) -> str:
        """What ``use`` reads, for source labels: its files, else its split."""
        kwargs = getattr(self, use)
        files = kwargs.get("data_files")
        return ", ".join(files.values()) if files else f"{kwargs['split']} split"


def _c4_validation_shard(index: int) -> dict:
    name = f"en/c4-validation.{index:05d}-of-00008.json.gz"
    return {"data_files": {"validation": name}, "split": "validation"}


NAMED_DATASETS: dict[str, NamedDataset] = {
    "wikitext2": NamedDataset(("wikitext", "wikitext-2-raw-v1"), {"split": "train"},
                              {"split": "test"}),
    "pg19": NamedDataset(("emozilla/pg19",), {"split": "validation"}, {"split": "test"}),
    "c4": NamedDataset(("allenai/c4",), _c4_validation_shard(0), _c4_validation_shard(1)),
}  # fmt: skip
MIN_TOKENS = 16  # below this there is nothing to average over


@dataclass
class CalibrationSet:
    """Token windows ``input_ids[n, seq_len]`` with ``attention_mask`` (0 marks padding)."""

    input_ids: object  # torch.LongTensor
    attention_mask: object  # torch.LongTensor
    source: str
    seq_len: int

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())

    def describe(self) -> dict:
        return {
            "source": self.source,
            "tokens": self.tokens,
            "seq_len": self.seq_len,
            "windows": int(self.input_ids.shape[0]),
        }


MAX_LINE_CHARS = 64 * 1024 * 1024  # one .jsonl line is parsed whole; longer ones are refused
_JSONL_HINT = "each line of a .jsonl file must be a JSON object with a 'text' field"


def _not_utf8(path: Path, where: str, exc: UnicodeDecodeError) -> CalibrationError:
    return CalibrationError(
        f"{path}{where} is not UTF-8 text ({exc.reason})", hint="save the file as UTF-8"
    )


def _read_jsonl(path: Path, char_budget: int) -> list[str]:
    """The 'text' fields of a .jsonl file, reading lines until ``char_budget`` characters."""
    texts, total, number = [], 0, 0
    with open(path, encoding="utf-8") as fh:
        while total < char_budget:
            number += 1
            try:
                line = fh.readline(MAX_LINE_CHARS + 1)
            except UnicodeDecodeError as exc:
                raise _not_utf8(path, f" near line {number}", exc) from None
            if not line:
                break
            if len(line) > MAX_LINE_CHARS:
                raise CalibrationError(
                    f"{path}:{number} is longer than {MAX_LINE_CHARS} characters",
                    hint="split the document over several lines",
                )
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (ValueError, RecursionError) as exc:
                raise CalibrationError(
                    f"{path}:{number} is not valid JSON ({str(exc)[:80]})", hint=_JSONL_HINT
                ) from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise CalibrationError(
                    f"{path}:{number} has no string field 'text'", hint=_JSONL_HINT
                )
            text = row["text"][: char_budget - total]
            texts.append(text)
            total += len(text)
    return texts


def _read_text(path: Path, char_budget: int) -> str:
    """The first ``char_budget`` characters of a UTF-8 text file (one huge line included)."""
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read(char_budget)
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, "", exc) from None


def _load_named(name: str, char_budget: int, use: str) -> list[str]:
    try:
        import datasets
    except ImportError as exc:
        raise CalibrationError(
            f"{FLAGS[use]} {name} needs the 'datasets' package",
            hint="pip install 'shortgpt-export[datasets]', or pass a local .txt/.jsonl file",
        ) from exc
    named = NAMED_DATASETS[name]
    try:
        rows = datasets.load_dataset(*named.args, streaming=True, **getattr(named, use))
        texts, total = [], 0
        for row in rows:
            text = row[named.field]
            if text and text.strip():
                texts.append(text)
                total += len(text)
            if total >= char_budget:
                break
    except Exception as exc:
        raise CalibrationError(
            f"could not load dataset {name!r} ({type(exc).__name__}: {str(exc)[:120]})",
            hint=f"check the network, or pass a local .txt or .jsonl file with {FLAGS[use]}",
        ) from exc
    return texts


def read_calibration_text(spec: str | None, char_budget: int = 10_000_000) -> tuple[list[str], str]:
    """Documents and a source label for ``--calib`` (file path, dataset name or None: the
    built-in calibration text)."""
    return read_text(spec, char_budget, "calibration")


def read_evaluation_text(spec: str | None, char_budget: int = 10_000_000) -> tuple[list[str], str]:
    """Documents and a source label for ``--eval``: a file as ``--calib`` reads it; a
    dataset's evaluation split and None's built-in evaluation text, both disjoint from what
    the same name gives ``--calib``."""
    return read_text(spec, char_budget, "evaluation")


def read_text(spec: str | None, char_budget: int, use: str) -> tuple[list[str], str]:
    """Documents and a source label of ``spec`` for ``use`` ("calibration" or "evaluation")."""
    if spec is None:
        name, label = BUILTIN_TEXTS[use]
        return [resources.files("shortgpt_export").joinpath(name).read_text("utf-8")], label
    if spec in NAMED_DATASETS:
        # calibration keeps the bare name (scores.json of earlier runs says so)
        label = spec if use == "calibration" else f"{spec} ({NAMED_DATASETS[spec].part(use)})"
        return _load_named(spec, char_budget, use), label
    path = Path(spec).expanduser()
    if not path.exists():
        raise CalibrationError(
            f"{use} file {spec!r} does not exist",
            hint=f"pass a .txt or .jsonl file, or one of: {', '.join(NAMED_DATASETS)}",
        )
    if not path.is_file():
        raise CalibrationError(
            f"{use} path {spec!r} is not a file", hint="pass a .txt or .jsonl file"
        )
    try:
        if path.suffix == ".jsonl":
            return _read_jsonl(path, char_budget), str(path)
        return [_read_text(path, char_budget)], str(path)
    except OSError as exc:
        raise CalibrationError(
            f"cannot read {use} file {path}: {exc.strerror or exc}",
            hint="pass a readable .txt or .jsonl file",
        ) from None


def text_budget(max_tokens: int | None) -> int:
    """Characters of text read for ``max_tokens`` tokens: a wide margin over ~4 per token."""
    return 8 * max_tokens if max_tokens else 10_000_000


def check_calibration_source(
    spec: str | None, max_tokens: int | None, use: str = "calibration"
) -> None:
    """Before the model is loaded: a --calib (or --eval) file exists, is a file, decodes,
    and is long enough to give the minimum tokens (a token spans at least one byte)."""
    if spec is None or spec in NAMED_DATASETS:
        return
    texts, source = read_text(spec, text_budget(max_tokens), use)
    size = sum(len(t.encode("utf-8")) for t in texts if t.strip())
    if size == 0:
        raise CalibrationError(f"{use} text {source} is empty", hint="pass a non-empty text")
    if size < MIN_TOKENS:
        raise CalibrationError(
            f"{use} text from {source} has {size} bytes, too few for {MIN_TOKENS} tokens",
            hint=f"pass a longer text with {FLAGS[use]}",
        )


def same_text(calib: str | None, evaluation: str | None) -> bool:
    """Whether ``--calib`` and ``--eval`` read the same text: one file, or two files with
    the same bytes (None stands for that use's built-in file). A dataset name gives each
    use its own part, so it never matches."""
    first, second = _text_file(calib, "calibration"), _text_file(evaluation, "evaluation")
    if first is None or second is None:
        return False
    try:
        if isinstance(first, Path) and isinstance(second, Path):
            if os.path.samefile(first, second):
                return True
            if first.stat().st_size != second.stat().st_size:  # no need to read them
                return False
        return _digest(first) == _digest(second)
    except OSError:  # one of them missing or unreadable: preflight reports it
        return False


def _text_file(spec: str | None, use: str):
    """The file ``spec`` reads for ``use`` (a package resource for None), None for a
    dataset."""
    if spec is None:
        return resources.files("shortgpt_export").joinpath(BUILTIN_TEXTS[use][0])
    return None if spec in NAMED_DATASETS else Path(spec).expanduser()


def _digest(file) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def tokenize_windows(
    tokenizer,
    texts: list[str],
    *,
    source: str,
    seq_len: int = 256,
    max_tokens: int | None = None,
    seed: int = 0,
) -> CalibrationSet:
    """Tokenize documents into one stream (EOS between them) and cut ``seq_len`` windows.

    When the stream is longer than ``max_tokens``, a seeded random subset of windows is
    kept. A final partial window is right-padded and masked. Each window starts with BOS
    when the tokenizer adds one by default.
    """
    import torch

    if seq_len < 2:
        raise CalibrationError(f"--seq-len {seq_len} is too small", hint="use at least 2")
    bos = _leading_bos(tokenizer)
    body = seq_len - (1 if bos is not None else 0)
    sep = tokenizer.eos_token_id
    stream: list[int] = []
    for text in texts:
        if not text.strip():
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if stream and sep is not None:
            stream.append(sep)
        stream.extend(ids)
    if len(stream) < MIN_TOKENS:
        raise CalibrationError(
            f"calibration text from {source} has {len(stream)} tokens, need at least {MIN_TOKENS}",
            hint="pass a longer text with --calib",
        )
    chunks = [stream[i : i + body] for i in range(0, len(stream), body)]
    if max_tokens is not None and len(chunks) * body > max_tokens:
        wanted = max(1, max_tokens // body)
        full = [c for c in chunks if len(c) == body] or chunks
        generator = torch.Generator().manual_seed(seed)
        picked = torch.randperm(len(full), generator=generator)[:wanted].sort().values
        chunks = [full[i] for i in picked.tolist()]
    else:
        log.info("calibration text gives %d tokens (asked for %s)", len(stream), max_tokens)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (sep or 0)
    input_ids = torch.full((len(chunks), seq_len), pad, dtype=torch.long)
    mask = torch.zeros((len(chunks), seq_len), dtype=torch.long)
    for row, chunk in enumerate(chunks):
        ids = ([bos] if bos is not None else []) + chunk
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
    return CalibrationSet(input_ids=input_ids, attention_mask=mask, source=source, seq_len=seq_len)


def _leading_bos(tokenizer) -> int | None:
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("x")["input_ids"]
    return bos if ids and ids[0] == bos else None


def load_calibration(
    tokenizer,
    spec: str | None,
    *,
    seq_len: int = 256,
    max_tokens: int | None = 8192,
    seed: int = 0,
) -> CalibrationSet:
    """Read ``--calib`` and return its token windows (see :func:`tokenize_windows`)."""
    texts, source = read_calibration_text(spec, char_budget=text_budget(max_tokens))
    if not any(t.strip() for t in texts):
        raise CalibrationError(f"calibration text {source} is empty", hint="pass a non-empty text")
    return tokenize_windows(
        tokenizer, texts, source=source, seq_len=seq_len, max_tokens=max_tokens, seed=seed
    )
