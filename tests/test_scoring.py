import math

import pytest
import torch
from helpers import random_calibration, reference_scores
from transformers import AutoModelForCausalLM

from shortgpt_export.architectures import spec_for
from shortgpt_export.errors import ShortGPTError
from shortgpt_export.scoring import LayerScores, score_layers


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, spec_for(model.config.model_type)


@pytest.mark.parametrize("metric", ["bi", "angular"])
@pytest.mark.parametrize("pad_last", [0, 9])
def test_hooked_scores_match_float64_reference(tiny, metric, pad_last):
    model, spec = tiny
    calib = random_calibration(model.config.vocab_size, rows=5, seq_len=32, pad_last=pad_last)
    hooked = score_layers(model, spec, calib, metric=metric, batch_size=2)
    reference = reference_scores(model, calib, metric)
    assert len(hooked) == model.config.num_hidden_layers
    assert hooked == pytest.approx(reference, abs=1e-6)
    # the layers really differ, so a ranking is meaningful
    assert max(hooked) - min(hooked) > 1e-3


def test_padding_tokens_do_not_count(tiny):
    """Changing the ids under padding must not change any score."""
    model, spec = tiny
    calib = random_calibration(model.config.vocab_size, rows=4, seq_len=24, pad_last=7)
    first = score_layers(model, spec, calib, batch_size=4)
    calib.input_ids[calib.attention_mask == 0] = 5
    second = score_layers(model, spec, calib, batch_size=4)
    assert first == pytest.approx(second, abs=1e-7)


def test_scores_are_deterministic_and_batch_independent(tiny):
    model, spec = tiny
    calib = random_calibration(model.config.vocab_size, rows=6, seq_len=16)
    one = score_layers(model, spec, calib, batch_size=1)
    again = score_layers(model, spec, calib, batch_size=1)
    three = score_layers(model, spec, calib, batch_size=3)
    assert one == again
    assert one == pytest.approx(three, abs=1e-6)


def test_hooks_are_removed_after_scoring(tiny):
    model, spec = tiny
    calib = random_calibration(model.config.vocab_size, rows=2, seq_len=8)
    score_layers(model, spec, calib)
    for layer in spec.decoder_layers(model):
        assert not layer._forward_hooks and not layer._forward_pre_hooks


def test_unknown_metric_is_rejected(tiny):
    model, spec = tiny
    calib = random_calibration(model.config.vocab_size, rows=1, seq_len=8)
    with pytest.raises(ShortGPTError, match="unknown metric 'cosine'"):
        score_layers(model, spec, calib, metric="cosine")


def test_scores_json_round_trip(tmp_path):
    scores = LayerScores(
        metric="bi",
        num_layers=3,
        scores=[0.5, 0.1, 0.9],
        model={"source": "x", "architecture": "llama"},
        calibration={"source": "t", "tokens": 10, "seq_len": 5},
    )
    scores.save(tmp_path / "scores.json")
    loaded = LayerScores.load(tmp_path / "scores.json")
    assert loaded == scores
    assert loaded.ranking() == [1, 0, 2]
    assert not math.isnan(loaded.scores[0])
