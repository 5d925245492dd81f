import json

import pytest
from transformers import AutoTokenizer

from shortgpt_export.calibration import DEFAULT_SOURCE, load_calibration
from shortgpt_export.errors import CalibrationError


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def test_builtin_default_needs_no_network(tokenizer):
    calib = load_calibration(tokenizer, None, seq_len=64, max_tokens=1024)
    assert calib.source == DEFAULT_SOURCE
    assert calib.input_ids.shape == (1024 // 64, 64)
    assert calib.tokens == 1024
    assert calib.describe()["tokens"] == 1024


def test_seeded_window_sampling(tokenizer):
    a = load_calibration(tokenizer, None, seq_len=32, max_tokens=256, seed=1)
    b = load_calibration(tokenizer, None, seq_len=32, max_tokens=256, seed=1)
    c = load_calibration(tokenizer, None, seq_len=32, max_tokens=256, seed=2)
    assert (a.input_ids == b.input_ids).all()
    assert not (a.input_ids == c.input_ids).all()


def test_short_text_uses_everything_and_pads_the_last_window(tokenizer, tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 6)
    n = len(tokenizer(path.read_text(), add_special_tokens=False).input_ids)
    calib = load_calibration(tokenizer, str(path), seq_len=32, max_tokens=10_000)
    assert calib.tokens == n
    assert calib.attention_mask[-1].sum() == n - 32 * (calib.input_ids.shape[0] - 1)
    assert calib.attention_mask[:-1].all()


def test_jsonl_documents_are_joined_with_eos(tokenizer, tmp_path):
    path = tmp_path / "calib.jsonl"
    rows = [
        {"text": "First document about rivers and deltas."},
        {"text": "Second document about violins."},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    calib = load_calibration(tokenizer, str(path), seq_len=128)
    assert (calib.input_ids[0] == tokenizer.eos_token_id).sum() >= 1
    assert calib.source == str(path)


@pytest.mark.parametrize(
    ("content", "name", "message"),
    [
        ("", "empty.txt", "is empty"),
        ("   \n\n  ", "blank.txt", "is empty"),
        ("Hi.", "short.txt", "tokens, need at least 16"),
        ('{"body": "x"}\n', "bad.jsonl", "has no string field 'text'"),
        ("not json\n", "bad2.jsonl", "is not valid JSON"),
    ],
)
def test_bad_calibration_text(tokenizer, tmp_path, content, name, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(CalibrationError, match=message):
        load_calibration(tokenizer, str(path))


def test_missing_calibration_file_names_alternatives(tokenizer):
    with pytest.raises(CalibrationError, match="does not exist") as info:
        load_calibration(tokenizer, "nope.txt")
    assert "wikitext2" in info.value.hint


def test_named_dataset_without_network_says_how_to_work_offline(tokenizer, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # without the optional 'datasets' package the error says how to install it instead
    with pytest.raises(CalibrationError, match="wikitext2") as info:
        load_calibration(tokenizer, "wikitext2")
    assert ".jsonl" in info.value.hint


def _shingles(text: str, n: int = 6) -> set[str]:
    """Every run of ``n`` words and punctuation marks, lower-cased."""
    import re

    words = re.findall(r"\w+|[^\w\s]", text.lower())
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def test_builtin_evaluation_text_is_not_the_calibration_text():
    from shortgpt_export.calibration import read_calibration_text, read_evaluation_text

    (calib,), calib_source = read_calibration_text(None)
    (evaluation,), eval_source = read_evaluation_text(None)
    assert (calib_source, eval_source) == (DEFAULT_SOURCE, "builtin:eval-v1")
    assert len(evaluation) > 10_000  # several windows of 512 tokens for the default model
    shared = _shingles(calib) & _shingles(evaluation)  # not even a stock phrase
    assert not shared, sorted(shared)[:3]


@pytest.mark.parametrize("name", ["wikitext2", "pg19", "c4"])
def test_named_datasets_give_calibration_and_evaluation_disjoint_parts(name, monkeypatch):
    """Each use loads its own split (or file) of a named dataset: a fake ``datasets``
    module records what was asked, so no network is needed."""
    import sys
    import types

    from shortgpt_export.calibration import (
        NAMED_DATASETS,
        read_calibration_text,
        read_evaluation_text,
    )

    asked = []

    def load_dataset(*args, **kwargs):
        asked.append((args, kwargs))
        return iter([{"text": f"row of {kwargs['split']}"}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    calib, calib_source = read_calibration_text(name)
    evaluation, eval_source = read_evaluation_text(name)
    (calib_args, calib_kwargs), (eval_args, eval_kwargs) = asked
    assert calib_args == eval_args == NAMED_DATASETS[name].args
    assert calib_kwargs.pop("streaming") and eval_kwargs.pop("streaming")
    assert calib_kwargs != eval_kwargs  # another split, or another file of the split
    assert calib_source == name and eval_source.startswith(f"{name} (")
    assert eval_source != calib_source and calib and evaluation


def test_same_text_is_one_file_or_equal_bytes(tmp_path, monkeypatch):
    from tiny_models import calibration_text

    from shortgpt_export.calibration import same_text

    text = tmp_path / "text.txt"
    text.write_text("some text")
    copy = tmp_path / "copy.txt"
    copy.write_text("some text")  # a copy is the same text
    other = tmp_path / "other.txt"
    other.write_text("some text!")
    link = tmp_path / "link.txt"
    link.symlink_to(text)
    monkeypatch.chdir(tmp_path)
    assert same_text(str(text), "text.txt") and same_text(str(link), str(text))
    assert same_text(str(text), str(copy))
    assert not same_text(str(text), str(other))
    assert not same_text(None, None)  # built-in: a calibration and an evaluation text
    builtin = tmp_path / "calibration-copy.txt"
    builtin.write_text(calibration_text(), encoding="utf-8")
    assert same_text(None, str(builtin)) and same_text(str(builtin), None) is False
    assert not same_text("wikitext2", "wikitext2")  # datasets: disjoint parts
    assert not same_text(str(text), str(tmp_path / "missing.txt"))


def test_evaluation_file_errors_name_the_evaluation(tmp_path):
    from shortgpt_export.calibration import check_calibration_source

    with pytest.raises(CalibrationError, match="evaluation file .* does not exist"):
        check_calibration_source(str(tmp_path / "nope.txt"), 100, "evaluation")
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    with pytest.raises(CalibrationError, match="evaluation text .* is empty"):
        check_calibration_source(str(empty), 100, "evaluation")
