"""Calibration text: read it, tokenize it once, cut it into fixed-length windows."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import CalibrationError

log = logging.getLogger(__name__)

DEFAULT_SOURCE = "builtin:mixed-v1"
# name -> (datasets.load_dataset args, kwargs, text field)
NAMED_DATASETS: dict[str, tuple[tuple, dict, str]] = {
    "wikitext2": (("wikitext", "wikitext-2-raw-v1"), {"split": "train"}, "text"),
    "pg19": (("emozilla/pg19",), {"split": "validation"}, "text"),
    "c4": (
        ("allenai/c4",),
        {
            "data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"},
            "split": "validation",
        },
        "text",
    ),
}
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


def _load_named(name: str, char_budget: int) -> list[str]:
    try:
        import datasets
    except ImportError as exc:
        raise CalibrationError(
            f"--calib {name} needs the 'datasets' package",
            hint="pip install 'shortgpt-export[datasets]', or pass a local .txt/.jsonl file",
        ) from exc
    args, kwargs, field = NAMED_DATASETS[name]
    try:
        rows = datasets.load_dataset(*args, streaming=True, **kwargs)
        texts, total = [], 0
        for row in rows:
            text = row[field]
            if text and text.strip():
                texts.append(text)
                total += len(text)
            if total >= char_budget:
                break
    except Exception as exc:
        raise CalibrationError(
            f"could not load dataset {name!r} ({type(exc).__name__}: {str(exc)[:120]})",
            hint="check the network, or pass a local .txt or .jsonl file with --calib",
        ) from exc
    return texts


def read_calibration_text(spec: str | None, char_budget: int = 10_000_000) -> tuple[list[str], str]:
    """Documents and a source label for ``--calib`` (file path, dataset name or None)."""
    if spec is None:
        text = (
            resources.files("shortgpt_export").joinpath("data/calibration.txt").read_text("utf-8")
        )
        return [text], DEFAULT_SOURCE
    if spec in NAMED_DATASETS:
        return _load_named(spec, char_budget), spec
    path = Path(spec).expanduser()
    if not path.exists():
        raise CalibrationError(
            f"calibration file {spec!r} does not exist",
            hint=f"pass a .txt or .jsonl file, or one of: {', '.join(NAMED_DATASETS)}",
        )
    if not path.is_file():
        raise CalibrationError(
            f"calibration path {spec!r} is not a file", hint="pass a .txt or .jsonl file"
        )
    try:
        if path.suffix == ".jsonl":
            return _read_jsonl(path, char_budget), str(path)
        return [_read_text(path, char_budget)], str(path)
    except OSError as exc:
        raise CalibrationError(
            f"cannot read calibration file {path}: {exc.strerror or exc}",
            hint="pass a readable .txt or .jsonl file",
        ) from None


def text_budget(max_tokens: int | None) -> int:
    """Characters of text read for ``max_tokens`` tokens: a wide margin over ~4 per token."""
    return 8 * max_tokens if max_tokens else 10_000_000


def check_calibration_source(spec: str | None, max_tokens: int | None) -> None:
    """Before the model is loaded: a --calib file exists, is a file, decodes, and is long
    enough to give the minimum tokens (a token spans at least one byte)."""
    if spec is None or spec in NAMED_DATASETS:
        return
    texts, source = read_calibration_text(spec, text_budget(max_tokens))
    size = sum(len(t.encode("utf-8")) for t in texts if t.strip())
    if size == 0:
        raise CalibrationError(f"calibration text {source} is empty", hint="pass a non-empty text")
    if size < MIN_TOKENS:
        raise CalibrationError(
            f"calibration text from {source} has {size} bytes, too few for {MIN_TOKENS} tokens",
            hint="pass a longer text with --calib",
        )


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
