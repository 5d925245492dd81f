"""--offload layers: the --remove auto budget and the healed block choice, one decoder
layer at a time, equal their in-memory versions."""

import json
from collections import Counter

import pytest
import torch
from helpers import FAST, random_calibration, run_cli, track_materialized
from test_streamed_healing import REL, assert_same_heal

from shortgpt_export import offload
from shortgpt_export.healing import down_proj
from shortgpt_export.layerwise import Stack
from shortgpt_export.recipe import held_out_perplexity
from shortgpt_export.selection import healed_block_plan
from shortgpt_export.source import load_model, resolve_source
from shortgpt_export.streamed_healing import healed_block_streamed


def _both(model_dir):
    source = resolve_source(str(model_dir))
    loaded = load_model(source, dtype="float32")
    streamed = offload.StreamedModel(source, loaded.tokenizer, "cpu", torch.float32)
    return loaded, streamed


def test_streamed_held_out_perplexity_equals_in_memory(tiny_model_dir):
    """The budget's perplexity of a pruned, patched model: the same streamed, padding
    included, and the patch counts (it moves the figure)."""
    loaded, streamed = _both(tiny_model_dir)
    calib = random_calibration(loaded.source.config.vocab_size, 5, 24, pad_last=5)
    keep = [0, 1, 4, 5]
    patch = {1: down_proj(Stack(loaded.model, loaded.source.spec), 1).weight.detach() * 0.5}
    for weights in (None, patch):
        memory = held_out_perplexity(loaded, calib, keep, weights, batch_size=2)
        stream = held_out_perplexity(streamed, calib, keep, weights, batch_size=2)
        assert stream == pytest.approx(memory, rel=REL)
    plain = held_out_perplexity(streamed, calib, keep, None, batch_size=2)
    assert abs(held_out_perplexity(streamed, calib, keep, patch, 2) / plain - 1) > 1e-3


def _distances(num_layers: int) -> list[list[float]]:
    """Block distances that rank the blocks of 2 starting at 3, 1, 2 closest (in order)."""
    rows = [[0.5 + 0.01 * s for s in range(num_layers - n + 1)] for n in range(1, num_layers)]
    rows[1][3], rows[1][1], rows[1][2] = 0.1, 0.2, 0.3
    return rows


def test_streamed_block_choice_equals_in_memory(tiny_model_dir):
    """Each of the 3 closest blocks healed and judged on the held-out windows: the same
    losses, the same block and the same patches."""
    loaded, streamed = _both(tiny_model_dir)
    calib = random_calibration(loaded.source.config.vocab_size, 10, 24, pad_last=5)
    distances = _distances(loaded.source.num_layers)
    options = {"ridge": None, "weighting": None}
    memory, memory_heal = healed_block_plan(
        loaded.model, loaded.source.spec, calib, distances, 2, candidates=3,
        heal_options=options, batch_size=3,
    )  # fmt: skip
    stream, stream_heal = healed_block_streamed(
        streamed, calib, distances, 2, candidates=3, heal_options=options, batch_size=3
    )
    assert stream.remove == memory.remove
    m_cands, s_cands = memory.selection["candidates"], stream.selection["candidates"]
    assert [c["start"] for c in s_cands] == [c["start"] for c in m_cands] == [1, 2, 3]
    for s, m in zip(s_cands, m_cands, strict=True):
        assert s["held_out_loss"] == pytest.approx(m["held_out_loss"], rel=REL)
    assert_same_heal(stream_heal, memory_heal)
    stream.selection.pop("candidates"), memory.selection.pop("candidates")
    assert stream.to_json() == memory.to_json()


def test_block_choice_loads_one_layer_at_a_time(tiny_llama_dir, monkeypatch):
    _, streamed = _both(tiny_llama_dir)
    calib = random_calibration(streamed.source.config.vocab_size, 8, 16)
    track = track_materialized(monkeypatch)
    healed_block_streamed(streamed, calib, _distances(6), 2, candidates=2, batch_size=2)
    assert track.most[0] == 1
    layers = Counter(p for p in track.seen if p.startswith("model.layers."))
    # per candidate: the heal's 3 passes over a layer at most, then one loss pass
    assert max(layers.values()) <= 2 * (3 + 1)


def _plan(capsys, model, calib_file, out, *extra):
    code, _, err = run_cli(
        capsys, model, "--calib", calib_file, "--out", out, *FAST, "--to", "hf", *extra
    )
    assert code == 0, err
    return " ".join(err.split()), json.loads((out / "plan.json").read_text())


def _no_whole_model(monkeypatch):
    import shortgpt_export.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("model loaded"))


def test_cli_budget_streams(tiny_llama_dir, calib_file, tmp_path, capsys, monkeypatch):
    """--remove auto with the default heal: every perplexity of the curve and the choice
    equal --offload none's, and the whole model is never loaded."""
    args = ("--remove", "auto", "--max-ppl-increase", "1.02")
    _, memory = _plan(capsys, tiny_llama_dir, calib_file, tmp_path / "m", *args)
    _no_whole_model(monkeypatch)
    err, stream = _plan(
        capsys, tiny_llama_dir, calib_file, tmp_path / "s", *args, "--offload", "layers"
    )
    assert "needs the whole model" not in err
    m_curve, s_curve = memory["budget"].pop("curve"), stream["budget"].pop("curve")
    assert len(m_curve) >= 2 and [c.get("remove") for c in s_curve] == [
        c.get("remove") for c in m_curve
    ]
    for s, m in zip(s_curve, m_curve, strict=True):
        assert s["perplexity"] == pytest.approx(m["perplexity"], rel=REL)
    assert stream["remove"] == memory["remove"] and stream["budget"] == memory["budget"]


def test_cli_block_with_healing_streams(tiny_llama_dir, calib_file, tmp_path, capsys, monkeypatch):
    args = ("--select", "block", "--remove", "2", "--heal", "linear")
    _, memory = _plan(capsys, tiny_llama_dir, calib_file, tmp_path / "m", *args)
    _no_whole_model(monkeypatch)
    err, stream = _plan(
        capsys, tiny_llama_dir, calib_file, tmp_path / "s", *args, "--offload", "layers"
    )
    assert "healing layer by layer" in err and "needs the whole model" not in err
    assert stream["remove"] == memory["remove"]
    m_cands = memory["selection"].pop("candidates")
    s_cands = stream["selection"].pop("candidates")
    assert len(m_cands) >= 2 and [c["start"] for c in s_cands] == [c["start"] for c in m_cands]
    for s, m in zip(s_cands, m_cands, strict=True):
        assert s["held_out_loss"] == pytest.approx(m["held_out_loss"], rel=REL)
    assert stream["selection"] == memory["selection"]
