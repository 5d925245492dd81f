"""A generation check: short questions asked in chat, scored by exact match.

Perplexity hides how badly layer removal hurts generation, so validation also asks every
artifact the built-in questions (``shortgpt_export/data/qa.jsonl``: facts, arithmetic,
one-step reasoning, a little code; written for this project) through the artifact's own
chat template, decodes greedily for at most ``max_new_tokens`` tokens and scores the
replies with :func:`is_correct`.

Matching rule (:func:`is_correct`): the reply is cut to its first sentence (up to the
first ``.``, ``!`` or ``?`` followed by a space or the end, or the first line break);
that sentence and every accepted answer are normalised (Unicode NFKC, lower case,
thousands separators dropped, every character other than a letter, a digit or a decimal
point between digits turned into a space); the reply is correct when one accepted answer
appears in it as a whole word or a run of whole words. ``Paris`` matches "The capital of
France is Paris." but not "Parisian food." nor a second sentence; ``3`` does not match
"3.5". No accepted answer appears in its own question (a test checks this), so a reply
that only repeats the question scores nothing.
"""

from __future__ import annotations

import json
import re
import time
import unicodedata
from dataclasses import dataclass, field
from functools import cache
from importlib import resources

INSTRUCTION = " Answer in one sentence."
FALLBACK_PROMPT = "Question: {question}\nAnswer:"  # for artifacts without a chat template
DEFAULT_MAX_NEW_TOKENS = 24

_SENTENCE_END = re.compile(r"[.!?](?=\s|$)|\n")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")
_NOT_WORD = re.compile(r"(?:(?<!\d)\.|\.(?!\d)|[^\w.]|_)+")


@dataclass(frozen=True)
class Question:
    question: str
    answers: tuple[str, ...]
    category: str

    @property
    def prompt(self) -> str:
        """What the user says in the chat: the question and the one-sentence instruction."""
        return self.question + INSTRUCTION


@dataclass
class QAResult:
    """Exact-match accuracy over ``total`` questions and the replies, in question order."""

    accuracy: float
    correct: int
    total: int
    answers: list[str]
    matched: list[bool] = field(default_factory=list)
    seconds: float = 0.0

    def as_record(self) -> dict:
        """The report.json fields of this result."""
        return {
            "qa_accuracy": self.accuracy,
            "qa_correct": self.correct,
            "qa_total": self.total,
            "qa_seconds": self.seconds,
            "qa_answers": self.answers,
            "qa_matched": self.matched,
        }


@cache
def questions() -> tuple[Question, ...]:
    """The built-in question set, in file order."""
    text = resources.files("shortgpt_export").joinpath("data/qa.jsonl").read_text("utf-8")
    rows = (json.loads(line) for line in text.splitlines() if line.strip())
    return tuple(Question(r["question"], tuple(r["answers"]), r["category"]) for r in rows)


def select(limit: int | None) -> tuple[Question, ...]:
    """The first ``limit`` questions (all of them for None)."""
    return questions() if limit is None else questions()[: max(0, limit)]


def normalize(text: str) -> str:
    """Lower case, NFKC, no thousands separators, punctuation as spaces, single spaces."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = _THOUSANDS.sub("", text)
    return " ".join(_NOT_WORD.sub(" ", text).split())


def first_sentence(reply: str) -> str:
    """The reply up to its first sentence end or line break (leading blanks skipped)."""
    reply = reply.strip()
    end = _SENTENCE_END.search(reply)
    return reply[: end.start()] if end else reply


def is_correct(reply: str, answers: tuple[str, ...] | list[str]) -> bool:
    """Whether an accepted answer appears as whole words in the reply's first sentence."""
    sentence = f" {normalize(first_sentence(reply))} "
    return any(f" {normalize(a)} " in sentence for a in answers if normalize(a))


def sentence_done(reply: str) -> bool:
    """True once the reply holds a complete first sentence (generation may stop)."""
    stripped = reply.strip()
    return bool(stripped) and _SENTENCE_END.search(stripped) is not None


def ask(evaluator, items, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> QAResult:
    """Ask ``items`` through ``evaluator`` (any back-end) and score the replies."""
    began = time.perf_counter()
    replies = [
        evaluator.generate_text(evaluator.chat_ids(item.prompt), max_new_tokens, sentence_done)
        for item in items
    ]
    matched = [is_correct(r, item.answers) for r, item in zip(replies, items, strict=True)]
    correct = sum(matched)
    return QAResult(
        accuracy=correct / len(items) if items else 0.0,
        correct=correct,
        total=len(items),
        answers=replies,
        matched=matched,
        seconds=time.perf_counter() - began,
    )


def run_qa(evaluator, *, limit: int | None = None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS):
    """:func:`ask` the first ``limit`` built-in questions (all for None)."""
    return ask(evaluator, select(limit), max_new_tokens)


def qa_record(evaluator, limit: int | None) -> dict:
    """The report.json fields of the QA check on ``limit`` questions; none for 0."""
    if limit == 0:
        return {}
    return run_qa(evaluator, limit=limit).as_record()


def torch_qa(
    model, tokenizer, *, limit: int | None = None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
) -> QAResult:
    """The QA check on an in-memory torch model (for instance a pruned view) on its device."""
    import torch

    from .evaluators import TorchEvaluator

    device = next(model.parameters()).device.type
    evaluator = TorchEvaluator(
        "in-memory", torch.get_num_threads(), model=model, tokenizer=tokenizer, device=device
    )
    return run_qa(evaluator, limit=limit, max_new_tokens=max_new_tokens)
