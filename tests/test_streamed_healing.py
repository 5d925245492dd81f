"""--offload layers: linear healing one decoder layer at a time equals the in-memory heal."""

import json
from collections import Counter

import pytest
import torch
from helpers import FAST, random_calibration, run_cli, track_materialized
from safetensors.torch import load_file

from shortgpt_export.healing import heal_linear
from shortgpt_export.source import load_model, resolve_source
from shortgpt_export.streamed_healing import stream_heal_linear

REL = 1e-5
LOSSES = ("held_out_loss_unhealed", "held_out_loss_healed", "held_out_loss")


def assert_same_heal(streamed, memory):
    assert sorted(streamed.weights) == sorted(memory.weights)
    for p, weight in memory.weights.items():
        scale = float(weight.abs().max())
        assert float((streamed.weights[p] - weight).abs().max()) <= REL * scale
        assert streamed.weights[p].dtype == weight.dtype
    assert (streamed.tokens, streamed.held_out_tokens) == (memory.tokens, memory.held_out_tokens)
    assert len(streamed.runs) == len(memory.runs)
    for s_run, m_run in zip(streamed.runs, memory.runs, strict=True):
        assert_same_entry(s_run, m_run)


def assert_same_entry(streamed: dict, memory: dict):
    assert streamed.keys() == memory.keys()
    for key, value in memory.items():
        if key == "candidates":
            for s, m in zip(streamed[key], value, strict=True):
                assert_same_entry(s, m)
        elif key in LOSSES or key.startswith("residual_"):
            assert streamed[key] == pytest.approx(value, rel=REL, abs=2e-6), key
        elif key == "skipped" and value.startswith("guard: held-out"):
            assert streamed[key].startswith("guard: held-out")
        else:
            assert streamed[key] == value, key


def both(source, calib, remove, batch_size=3, **kwargs):
    loaded = load_model(source, dtype="float32")
    memory = heal_linear(loaded.model, source.spec, calib, remove, batch_size=batch_size, **kwargs)
    streamed = stream_heal_linear(
        source, calib, remove, dtype=torch.float32, batch_size=batch_size, **kwargs
    )
    return memory, streamed


def test_streamed_heal_equals_in_memory_for_every_family(tiny_model_dir):
    """A run at layer 0 (skipped) and two healable runs: the same patches, guard decisions
    and held-out losses, though the streamed batches are smaller."""
    source = resolve_source(str(tiny_model_dir))
    calib = random_calibration(source.config.vocab_size, 10, 24, pad_last=5)
    memory, streamed = both(source, calib, [0, 2, 4])
    assert memory.runs[0]["skipped"].startswith("starts at layer 0")
    assert all("held_out_loss_healed" in run for run in memory.runs[1:])
    assert_same_heal(streamed, memory)


def test_every_candidate_patch_is_a_branch_of_the_guard_pass(tiny_llama_dir):
    source = resolve_source(str(tiny_llama_dir))
    calib = random_calibration(source.config.vocab_size, 10, 24, pad_last=5)
    memory, streamed = both(source, calib, [2, 4], ridge=None)
    assert [len(run["candidates"]) for run in memory.runs] == [3, 3]
    assert_same_heal(streamed, memory)


def test_later_runs_see_earlier_patches_and_spilled_buffers_are_removed(tiny_llama_dir, tmp_path):
    source = resolve_source(str(tiny_llama_dir))
    calib = random_calibration(source.config.vocab_size, 12, 24, pad_last=5, seed=1)
    loaded = load_model(source, dtype="float32")
    memory = heal_linear(loaded.model, source.spec, calib, [1, 3], batch_size=3, guard=False)
    assert sorted(memory.weights) == [0, 2]  # both runs patched: the second after the first
    streamed = stream_heal_linear(
        source, calib, [1, 3], batch_size=3, guard=False, spill=True, spill_dir=tmp_path
    )
    assert_same_heal(streamed, memory)
    assert list(tmp_path.iterdir()) == []
    # the second fit ran through the first patch: fitted on the unpatched layer 0 it differs
    alone = heal_linear(loaded.model, source.spec, calib, [3], batch_size=3, guard=False)
    assert float((alone.weights[2] - memory.weights[2]).abs().max()) > 1e-3


def assert_same_refit(streamed: dict, memory: dict):
    assert streamed["kept"] == memory["kept"]
    for key in ("held_out_loss_before", "held_out_loss_after"):
        assert streamed[key] == pytest.approx(memory[key], rel=REL, abs=2e-6), key
    assert len(streamed["layers"]) == len(memory["layers"])
    for s_layer, m_layer in zip(streamed["layers"], memory["layers"], strict=True):
        assert_same_entry(s_layer, m_layer)


@pytest.mark.parametrize("remove", [[2, 4], [0], [0, 3]])
def test_streamed_refit_equals_in_memory(tiny_model_dir, remove):
    """--heal refit: the run patches, then every kept layer from the first cut refitted to
    the original model's next state, in one more layer-by-layer pass; the same refits,
    residuals and held-out losses (a removal at layer 0 has no run to patch: a refit
    alone, its baseline computed in the pass; with a later run too, the refit pass starts
    at layer 0 of the original and layer 1 of the pruned model)."""
    source = resolve_source(str(tiny_model_dir))
    calib = random_calibration(source.config.vocab_size, 10, 24, pad_last=5)
    memory, streamed = both(source, calib, remove, refit=True, ridge=None)
    assert isinstance(memory.refit, dict) and len(memory.refit["layers"]) >= 3
    assert_same_refit(streamed.refit, memory.refit)
    assert_same_heal(streamed, memory)


def test_kept_refit_changes_the_weights_like_in_memory(tiny_llama_dir, tmp_path):
    """A calibration set where the refit is kept: the refitted down projections (not only
    the run patches) come back, equal to the in-memory ones, spilled buffers removed."""
    source = resolve_source(str(tiny_llama_dir))
    calib = random_calibration(source.config.vocab_size, 48, 24)
    loaded = load_model(source, dtype="float32")
    memory = heal_linear(loaded.model, source.spec, calib, [1], batch_size=2, refit=True)
    streamed = stream_heal_linear(
        source, calib, [1], batch_size=2, refit=True, spill=True, spill_dir=tmp_path
    )
    refit = memory.refit  # measured: 3 layers refitted, held-out loss 7.1215 -> 7.0537
    assert refit["kept"] and refit["held_out_loss_after"] < refit["held_out_loss_before"]
    refitted = [e["layer"] for e in refit["layers"] if e["kept"]]
    assert len(refitted) >= 2 and set(refitted) <= set(memory.weights)
    assert_same_refit(streamed.refit, memory.refit)
    assert_same_heal(streamed, memory)
    assert list(tmp_path.iterdir()) == []


def test_one_decoder_layer_in_memory_at_a_time(tiny_llama_dir, monkeypatch):
    source = resolve_source(str(tiny_llama_dir))
    calib = random_calibration(source.config.vocab_size, 8, 16)
    track = track_materialized(monkeypatch)
    result = stream_heal_linear(source, calib, [1, 3], batch_size=2, ridge=None)
    # no decoder layer is left; the final norm and LM head go with the skeleton
    assert track.most[0] == 1 and set(track.live.values()) == {"model.norm.", "lm_head."}
    loads = Counter(track.seen)
    healed = [r for r in result.runs if r["patched_layer"] is not None]
    assert healed and all("held_out_loss_healed" in r for r in result.runs)
    # 1 original pass + a fitting and a guard pass per run: each layer at most 1 + 2 times
    # in all (not once per batch), the LM head once
    layers = {p: c for p, c in loads.items() if p.startswith("model.layers.")}
    assert max(layers.values()) <= 3 and sum(layers.values()) <= 3 * 6
    assert loads["lm_head."] == 1 and loads["model.norm."] == 1


def _run(capsys, model, calib_file, out, *extra):
    code, _, err = run_cli(
        capsys, model, "--calib", calib_file, "--out", out, *FAST, "--layers", "2,3",
        "--to", "hf", *extra,
    )  # fmt: skip
    assert code == 0, err
    return err, json.loads((out / "plan.json").read_text())


def test_cli_offload_layers_heals_without_the_whole_model(
    tiny_llama_dir, calib_file, tmp_path, capsys, monkeypatch
):
    _, memory = _run(capsys, tiny_llama_dir, calib_file, tmp_path / "m", "--offload", "none")
    import shortgpt_export.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    err, streamed = _run(
        capsys, tiny_llama_dir, calib_file, tmp_path / "s", "--offload", "layers", "--verbose"
    )
    err = " ".join(err.split())
    assert "healing layer by layer" in err and "needs the whole model" not in err
    # the default --heal auto heals the run; the plans agree but for timings and paths
    assert [run["patched_layer"] for run in memory["heal"]["runs"]] == [1]
    for s_run, m_run in zip(streamed["heal"].pop("runs"), memory["heal"].pop("runs"), strict=True):
        assert_same_entry(s_run, m_run)
    for plan in (streamed, memory):
        plan.pop("root", None)
        plan["heal"].pop("seconds")
    assert streamed == memory
    # the exported folders are the same model
    m_dir, s_dir = tmp_path / "m" / "hf", tmp_path / "s" / "hf"
    assert json.loads((s_dir / "config.json").read_text()) == json.loads(
        (m_dir / "config.json").read_text()
    )
    names = sorted(p.name for p in m_dir.glob("*.safetensors"))
    assert names and names == sorted(p.name for p in s_dir.glob("*.safetensors"))
    for name in names:
        m_tensors, s_tensors = load_file(m_dir / name), load_file(s_dir / name)
        assert m_tensors.keys() == s_tensors.keys()
        for key, tensor in m_tensors.items():
            scale = float(tensor.abs().max()) or 1.0
            assert float((s_tensors[key] - tensor).abs().max()) <= REL * scale, key


def test_cli_refit_streams(tiny_llama_dir, calib_file, tmp_path, capsys, monkeypatch):
    def plan(out, offload):
        code, _, err = run_cli(
            capsys, tiny_llama_dir, "--calib", calib_file, "--out", out, *FAST, "--to", "hf",
            "--offload", offload, "--heal", "refit", "--remove", "2",
        )  # fmt: skip
        assert code == 0, err
        return json.loads((out / "plan.json").read_text())

    memory = plan(tmp_path / "m", "none")
    import shortgpt_export.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    streamed = plan(tmp_path / "s", "layers")
    assert streamed["remove"] == memory["remove"]
    assert isinstance(memory["heal"]["refit"], dict)
    assert_same_refit(streamed["heal"]["refit"], memory["heal"]["refit"])


def test_gguf_source_with_a_tied_head_heals_the_same(tiny_tokenizer_dir, tmp_path):
    """Dequantized one layer at a time, the LM head read from the token embeddings (a tied
    model's GGUF has no output tensor): the same heal as the GGUF loaded whole."""
    from test_offload import _tiny_gguf
    from tiny_models import build_tiny_model

    folder = build_tiny_model(
        "llama", tiny_tokenizer_dir, tmp_path / "hf", full_attention=True, tie_word_embeddings=True
    )
    source = _tiny_gguf(folder, tmp_path / "tied.gguf", "F32")
    assert source.kind == "gguf" and source.config.tie_word_embeddings
    calib = random_calibration(source.config.vocab_size, 8, 24, pad_last=5)
    memory, streamed = both(source, calib, [2, 3])
    assert "held_out_loss_healed" in memory.runs[0]  # the guard's losses: through the head
    assert_same_heal(streamed, memory)


def test_cli_greedy_then_heal_streams_both_steps(
    tiny_llama_dir, calib_file, tmp_path, capsys, monkeypatch
):
    """--select greedy and the default heal after it: neither step loads the whole model
    (streamed_greedy, then streamed_healing), and the plan is the in-memory one."""

    def run(out, *extra):
        code, _, err = run_cli(
            capsys, tiny_llama_dir, "--calib", calib_file, "--out", out, *FAST,
            "--select", "greedy", "--remove", "2", "--to", "hf", *extra,
        )  # fmt: skip
        assert code == 0, err
        return " ".join(err.split()), json.loads((out / "plan.json").read_text())

    _, memory = run(tmp_path / "m", "--offload", "none")
    import shortgpt_export.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    err, streamed = run(tmp_path / "s", "--offload", "layers", "--verbose")
    assert "healing layer by layer" in err and "needs the whole model" not in err
    assert streamed["remove"] == memory["remove"]
    runs = streamed["heal"]["runs"]
    assert runs and len(runs) == len(memory["heal"]["runs"])
    for s_run, m_run in zip(runs, memory["heal"]["runs"], strict=True):
        assert_same_entry(s_run, m_run)
