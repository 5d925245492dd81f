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
