"""The built-in QA check: the question set, the matching rule, generation on every back-end."""

import json
import shutil

import pytest
from helpers import export_with_cli

from shortgpt_export.validation.qa import (
    QAResult,
    first_sentence,
    is_correct,
    normalize,
    questions,
    torch_qa,
)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.parametrize(
    ("reply", "answers", "expected"),
    [
        ("The capital of France is Paris.", ["Paris"], True),
        ("  paris", ["Paris"], True),
        ("**Paris**!", ["Paris"], True),
        ("Parisian food is good.", ["Paris"], False),
        ("I am not sure. It is Paris.", ["Paris"], False),  # only the first sentence counts
        ("It is London\nParis", ["Paris"], False),  # a line break ends the sentence
        ("7 + 5 = 12.", ["12", "twelve"], True),
        ("Seven plus five is Twelve.", ["12", "twelve"], True),
        ("The answer is 112.", ["12"], False),
        ("17 // 5 is 3.5 in Python.", ["3"], False),  # a decimal is one number
        ("17 // 5 evaluates to 3.", ["3"], True),
        ("There are 1,000 of them.", ["1000"], True),
        ("Plants take in carbon   dioxide.", ["carbon dioxide"], True),
        ("Plants take in carbon.", ["carbon dioxide"], False),
        ("It returns ＡＢＡＢＡＢ.", ["ababab"], True),  # NFKC folds full-width letters
        ("", ["Paris"], False),
        ("Paris", [""], False),  # an empty accepted answer never matches
    ],
)
def test_matching_rule(reply, answers, expected):
    assert is_correct(reply, answers) is expected


def test_normalize_and_first_sentence():
    assert normalize("  Hello,   World!  3.5 -- x_y ") == "hello world 3.5 x y"
    assert normalize("Mr. 12.") == "mr 12"
    assert first_sentence("\n\nYes. No.") == "Yes"
    assert first_sentence("pi is 3.14 roughly") == "pi is 3.14 roughly"


def test_question_set():
    items = questions()
    assert len(items) >= 50
    assert {q.category for q in items} == {"fact", "arithmetic", "reasoning", "code"}
    assert min(sum(q.category == c for q in items) for c in ("code", "reasoning")) >= 5
    assert len({q.question for q in items}) == len(items)
    for item in items:
        assert item.answers and all(normalize(a) for a in item.answers), item
        # a reply that only repeats the question must not score
        assert not is_correct(item.question, item.answers), item.question
        assert all(a == a.strip() for a in item.answers)


@pytest.fixture(scope="module")
def chat_model_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny llama with a ChatML chat template, like an instruct model's."""
    out = tmp_path_factory.mktemp("chat") / "model"
    shutil.copytree(tiny_llama_dir, out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config["chat_template"] = CHATML
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def hf_greedy(model, prompt, max_new_tokens):
    """transformers' own greedy decoding, to check the evaluators' loop against."""
    import torch

    out = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=model.config.eos_token_id,
        pad_token_id=model.config.eos_token_id,
    )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("templated", [False, True])
def test_torch_qa_is_greedy_and_well_formed(tiny_llama_dir, chat_model_dir, templated):
    from shortgpt_export.validation.evaluators import TorchEvaluator

    model, tokenizer = load(chat_model_dir if templated else tiny_llama_dir)
    result = torch_qa(model, tokenizer, limit=4, max_new_tokens=6)
    assert isinstance(result, QAResult)
    assert result.total == 4 and len(result.answers) == 4 and len(result.matched) == 4
    assert result.correct == sum(result.matched)
    assert result.accuracy == result.correct / 4
    assert all(isinstance(a, str) for a in result.answers)
    evaluator = TorchEvaluator("x", 1, model=model, tokenizer=tokenizer)
    for item, answer in zip(questions()[:4], result.answers, strict=True):
        prompt = evaluator.chat_ids(item.prompt)
        text = tokenizer.decode(prompt)
        if templated:
            assert text.startswith("<|im_start|>user\n" + item.question)
            assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
        else:
            assert text == f"Question: {item.question} Answer in one sentence.\nAnswer:"
        ids = evaluator.generate(prompt, 6)  # no sentence stop: the full greedy run
        expected = hf_greedy(model, prompt, 6)
        assert ids == [t for t in expected if t not in evaluator.eog_ids][: len(ids)]
        assert len(ids) == 6 or expected[len(ids)] in evaluator.eog_ids
        # the reply is that run, cut at the end of its first sentence at the latest
        decoded = [tokenizer.decode(ids[:k], skip_special_tokens=True) for k in range(7)]
        assert answer in decoded
    assert torch_qa(model, tokenizer, limit=0).total == 0


def test_stop_rules(tiny_llama_dir):
    from shortgpt_export.validation.evaluators import TorchEvaluator

    model, tokenizer = load(tiny_llama_dir)
    evaluator = TorchEvaluator("x", 1, model=model, tokenizer=tokenizer)
    prompt = evaluator.chat_ids(questions()[0].prompt)
    full = evaluator.generate(prompt, 8)
    assert len(full) == 8
    # stop as soon as the text so far satisfies the predicate: after the third token
    seen = []
    stopped = evaluator.generate(prompt, 8, lambda text: seen.append(text) or len(seen) == 3)
    assert stopped == full[:3]
    # an end-of-generation token ends the reply before it is emitted
    evaluator.eog_ids = frozenset({full[2]})
    assert evaluator.generate(prompt, 8) == full[: full.index(full[2])]


@pytest.fixture(scope="module")
def chat_exports(chat_model_dir, tmp_path_factory):
    """The chat model, unpruned, as F16 GGUF and fp32 ONNX."""
    out = export_with_cli(
        chat_model_dir,
        tmp_path_factory.mktemp("chat-exports"),
        "--to",
        "gguf,onnx",
        "--quant",
        "f16",
        "--fp32",
        "--remove",
        "0",
    )
    return chat_model_dir, next(out.glob("*.gguf")), out / "onnx-fp32"


def test_three_backends_ask_the_same_prompt_and_answer_alike(chat_exports):
    from shortgpt_export.validation.evaluators import open_evaluator
    from shortgpt_export.validation.qa import run_qa

    source, gguf, onnx = chat_exports
    results, prompts = {}, {}
    for path in (source, gguf, onnx):
        evaluator = open_evaluator(path, threads=1, n_ctx=256)
        try:
            prompts[path] = [evaluator.chat_ids(q.prompt) for q in questions()[:4]]
            results[path] = run_qa(evaluator, limit=4, max_new_tokens=6)
        finally:
            evaluator.close()
    # the GGUF carries the template in its metadata; llama.cpp renders it identically
    assert prompts[gguf] == prompts[source] == prompts[onnx]
    for result in results.values():
        assert result.total == 4 and len(result.answers) == 4
        assert result.correct == sum(result.matched)
    # peaked random weights: greedy replies agree across back-ends
    assert results[onnx].answers == results[source].answers
    agree = sum(a == b for a, b in zip(results[gguf].answers, results[source].answers, strict=True))
    assert agree >= 3, (results[gguf].answers, results[source].answers)


@pytest.mark.default_model
def test_the_default_model_answers_questions(default_gguf):
    """SmolLM2-135M-Instruct answers easy questions right, in llama.cpp and in torch."""
    from shortgpt_export.source import load_model, resolve_source
    from shortgpt_export.validation.evaluators import LlamaCppEvaluator
    from shortgpt_export.validation.qa import run_qa

    evaluator = LlamaCppEvaluator(default_gguf, threads=2, n_ctx=512)
    try:
        gguf = run_qa(evaluator, limit=8)
    finally:
        evaluator.close()
    assert "Paris" in gguf.answers[0] and gguf.matched[0]
    assert gguf.correct >= 2, gguf.answers  # measured: 3 of these 8 (Q4_1, 2026-11-29)

    loaded = load_model(resolve_source(None), device="cpu")
    torch_result = torch_qa(loaded.model, loaded.tokenizer, limit=4)
    assert "Paris" in torch_result.answers[0] and torch_result.matched[0]
    assert torch_result.correct >= 1, torch_result.answers
