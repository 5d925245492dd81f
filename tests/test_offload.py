"""--offload layers: scoring one decoder layer at a time equals scoring the whole model."""

import json
import logging

import pytest
import torch
from helpers import FAST, random_calibration, run_cli, track_materialized
from tiny_models import build_tiny_model

from shortgpt_export import gguf_layers, offload
from shortgpt_export.errors import ShortGPTError
from shortgpt_export.planning import Plan
from shortgpt_export.scoring import score_layers
from shortgpt_export.source import load_model, resolve_source

REL = 1e-6


def assert_close(streamed, in_memory):
    assert len(streamed) == len(in_memory)
    for s, m in zip(streamed, in_memory, strict=True):
        assert abs(s - m) <= REL * abs(m), (streamed, in_memory)


def both(source, calib, dtype="float32", batch_size=3, **kwargs):
    loaded = load_model(source, dtype=dtype)
    memory = score_layers(loaded.model, source.spec, calib, batch_size=batch_size, blocks=True)
    streamed = offload.stream_scores(
        source, calib, dtype=loaded.model.dtype, batch_size=batch_size, blocks=True, **kwargs
    )
    return memory, streamed


def test_streamed_scores_equal_in_memory_for_every_family(tiny_model_dir):
    source = resolve_source(str(tiny_model_dir))
    # 7 windows in batches of 3: a short last batch, and padding on odd rows
    calib = random_calibration(source.config.vocab_size, 7, 24, pad_last=5)
    (scores, blocks), (s_scores, s_blocks) = both(source, calib)
    assert len(set(scores)) == len(scores)  # distinct layers: equality is not trivial
    assert_close(s_scores, scores)
    for row, s_row in zip(blocks, s_blocks, strict=True):
        assert_close(s_row, row)


def test_scoring_windows_per_pass_follows_batch_size_up_to_two():
    assert [offload.scoring_windows_per_pass(b) for b in (1, 2, 3, 16)] == [1, 2, 2, 2]
    with pytest.raises(ShortGPTError, match="--batch-size 0 must be at least 1"):
        offload.scoring_windows_per_pass(0)


@pytest.mark.parametrize(("batch_size", "batches"), [(3, 4), (1, 7)])
def test_streamed_scoring_runs_at_most_two_windows_per_pass_with_the_in_memory_scores(
    tiny_model_dir, monkeypatch, batch_size, batches
):
    """score_streamed (what --offload layers scores with) runs --batch-size windows per
    pass, at most two (7 windows: 4 batches, or 7 when one is asked for); the in-memory
    scorer's batches of 3 (a short last one, padding) give the same scores."""
    source = resolve_source(str(tiny_model_dir))
    calib = random_calibration(source.config.vocab_size, 7, 24, pad_last=5)
    loaded = load_model(source, dtype="float32")
    memory = score_layers(loaded.model, source.spec, calib, batch_size=3, blocks=True)
    streams = []
    real = offload.LayerStream

    def recording(*args, **kwargs):
        streams.append(real(*args, **kwargs))
        return streams[-1]

    monkeypatch.setattr(offload, "LayerStream", recording)
    streamed = offload.StreamedModel(source, None, "cpu", loaded.model.dtype)
    result = offload.score_streamed(streamed, calib, batch_size=batch_size, blocks=True)
    assert [len(s.batches) for s in streams] == [batches]
    assert_close(result.scores, memory[0])
    for row, s_row in zip(memory[1], result.block_distances, strict=True):
        assert_close(s_row, row)


def test_spilled_activations_and_bfloat16_give_the_same_scores(tiny_llama_dir, tmp_path):
    source = resolve_source(str(tiny_llama_dir))
    calib = random_calibration(source.config.vocab_size, 5, 16, pad_last=3)
    (scores, _), (streamed, _) = both(
        source, calib, dtype="bfloat16", spill=True, spill_dir=tmp_path
    )
    assert_close(streamed, scores)
    assert list(tmp_path.iterdir()) == []  # the memory-mapped files are removed
    loaded = load_model(source, dtype="float32")
    f32 = score_layers(loaded.model, source.spec, calib, batch_size=3)
    assert max(abs(a - b) / a for a, b in zip(streamed, f32, strict=True)) > REL  # dtype matters


def test_one_decoder_layer_in_memory_at_a_time(tiny_llama_dir, monkeypatch):
    source = resolve_source(str(tiny_llama_dir))
    calib = random_calibration(source.config.vocab_size, 4, 16)
    track = track_materialized(monkeypatch)
    offload.stream_scores(source, calib, batch_size=2)
    assert track.most[0] == 1 and not track.live
    # the embedding rows the windows use are read alone; the matrix is never loaded
    assert track.seen == [f"model.layers.{i}." for i in range(6)]


def _tiny_gguf(model_dir, target, out_type):
    from shortgpt_export.converters import ExportContext
    from shortgpt_export.converters.gguf.hf_to_gguf import convert_pruned

    source = resolve_source(str(model_dir))
    plan = Plan(num_layers=6, remove=[], keep=list(range(6)), metric="bi", reason="test")
    ctx = ExportContext(source=source, plan=plan, out_dir=target.parent)
    convert_pruned(ctx, target, out_type=out_type)
    return resolve_source(str(target))


@pytest.mark.parametrize(("family", "out_type"), [("llama", "Q8_0"), ("qwen2", "F32")])
def test_gguf_streamed_agrees_with_the_gguf_loaded_whole(
    family, out_type, tiny_tokenizer_dir, tmp_path, monkeypatch
):
    folder = build_tiny_model(family, tiny_tokenizer_dir, tmp_path / "hf", full_attention=True)
    source = _tiny_gguf(folder, tmp_path / f"tiny-{out_type}.gguf", out_type)
    assert source.kind == "gguf"
    # the memory estimate reads the header alone; gguf's own reader counts the same
    from gguf import GGUFReader

    elements = sum(int(t.n_elements) for t in GGUFReader(source.path).tensors)
    assert offload.model_bytes(source, torch.float32) == 4 * elements
    calib = random_calibration(source.config.vocab_size, 5, 16, pad_last=4)
    (scores, _), (streamed, _) = both(source, calib)
    assert_close(streamed, scores)
    if source.spec.gguf_permute_qk:  # without undoing llama.cpp's q/k row order it differs
        monkeypatch.setattr(gguf_layers, "deinterleave_rope_rows", lambda w, heads: w)
        wrong = offload.stream_scores(source, calib, batch_size=3)
        assert max(abs(a - b) / a for a, b in zip(wrong, scores, strict=True)) > 1e-3


def test_deinterleave_undoes_the_gguf_export_permutation():
    # the export's q/k reorder (tensor_stream.stream_float): per head, (2, r) rows -> (r, 2)
    weight = torch.arange(8 * 16 * 3).reshape(8 * 16, 3)
    interleaved = weight.view(8, 2, 8, 3).transpose(1, 2).reshape(weight.shape).numpy()
    back = gguf_layers.deinterleave_rope_rows(interleaved, 8)
    assert (back == weight.numpy()).all()
    assert not (interleaved == weight.numpy()).all()


def _scores_json(capsys, model, calib_file, out, *extra):
    code, _, err = run_cli(
        capsys, "score", model, "--calib", calib_file, "--out", out, *FAST, *extra
    )
    assert code == 0, err
    return json.loads((out / "scores.json").read_text())


def test_cli_offload_layers_writes_the_in_memory_scores(
    tiny_llama_dir, calib_file, tmp_path, capsys, monkeypatch
):
    memory = _scores_json(capsys, tiny_llama_dir, calib_file, tmp_path / "m", "--offload", "none")
    import shortgpt_export.pipeline as pipeline

    def no_whole_model(*args, **kwargs):
        raise AssertionError("the whole model was loaded")

    monkeypatch.setattr(pipeline, "load_model", no_whole_model)
    streamed = _scores_json(
        capsys, tiny_llama_dir, calib_file, tmp_path / "s", "--offload", "layers"
    )
    assert_close(streamed["scores"], memory["scores"])
    assert_close(streamed["block_distances"][1], memory["block_distances"][1])
    assert streamed["calibration"] == memory["calibration"]


def test_auto_offload_when_the_model_does_not_fit(tiny_llama_dir, caplog, monkeypatch):
    source = resolve_source(str(tiny_llama_dir))
    need = offload.model_bytes(source, torch.float32)
    monkeypatch.setattr(offload, "free_memory", lambda device: need * 10)
    assert not offload.choose_offload("auto", source, "cpu", torch.float32)
    monkeypatch.setattr(offload, "free_memory", lambda device: need)
    with caplog.at_level(logging.WARNING, logger="shortgpt_export.offload"):
        assert offload.choose_offload("auto", source, "cpu", torch.float32)
    assert "scoring layer by layer" in caplog.text
    assert offload.choose_offload("layers", source, "cpu", torch.float32)
    assert not offload.choose_offload("none", source, "cpu", torch.float32)
    with pytest.raises(ShortGPTError, match="--offload 'disk'"):
        offload.choose_offload("disk", source, "cpu", torch.float32)


def test_run_with_offload_exports_without_the_whole_model(
    tiny_llama_dir, calib_file, tmp_path, capsys, monkeypatch
):
    import shortgpt_export.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    out = tmp_path / "out"
    code, _, err = run_cli(
        capsys, tiny_llama_dir, "--calib", calib_file, "--out", out, *FAST,
        "--offload", "layers", "--heal", "none", "--remove", "2", "--to", "hf",
    )  # fmt: skip
    assert code == 0, err
    plan = json.loads((out / "plan.json").read_text())
    scores = json.loads((out / "scores.json").read_text())["scores"]
    worst = sorted(range(6), key=lambda i: (scores[i], i))[:2]
    assert sorted(plan["remove"]) == sorted(worst)
    assert json.loads((out / "hf" / "config.json").read_text())["num_hidden_layers"] == 4


def test_streamed_reference_equals_the_pruned_view(tiny_model_dir):
    """Export verification's reference, one layer at a time: the same log-probabilities as
    the pruned (and healed) view of the model in memory."""
    from shortgpt_export.fidelity import pruned_reference
    from shortgpt_export.healing import down_proj
    from shortgpt_export.layerwise import Stack
    from shortgpt_export.planning import make_plan
    from shortgpt_export.pruning import healed

    source = resolve_source(str(tiny_model_dir))
    loaded = load_model(source, dtype="float32")
    generator = torch.Generator().manual_seed(0)
    windows = torch.randint(3, source.config.vocab_size, (3, 16), generator=generator)
    streamed = offload.StreamedModel(source, loaded.tokenizer, "cpu", torch.float32)
    plan = make_plan(source.num_layers, layers=[2, 3])
    memory = pruned_reference(loaded, plan, windows)
    stream = offload.stream_logprobs(streamed, plan.keep, windows, batch_size=2)
    assert stream.shape == memory.shape and (stream - memory).abs().max() < 1e-5
    patch = {1: down_proj(Stack(loaded.model, source.spec), 1).weight.detach() * 0.5}
    with healed(loaded.model, plan.keep, patch):
        healed_memory = pruned_reference(loaded, plan, windows)
    healed_stream = offload.stream_logprobs(streamed, plan.keep, windows, patch)
    assert (healed_memory - memory).abs().max() > 1e-2  # the patch changes the model
    assert (healed_stream - healed_memory).abs().max() < 1e-5


@pytest.mark.parametrize("family", ["gemma2", "granite"])
def test_streamed_reference_applies_the_family_logit_transform(family, family_dirs):
    """Gemma 2 soft-caps its logits and Granite scales them: the streamed reference does
    too (it compared the head's raw output before, off by up to 2.9 in log-probability)."""
    from shortgpt_export.fidelity import pruned_reference
    from shortgpt_export.planning import make_plan

    source = resolve_source(str(family_dirs(family)))
    loaded = load_model(source, dtype="float32")
    windows = torch.randint(3, source.config.vocab_size, (2, 16))
    streamed = offload.StreamedModel(source, loaded.tokenizer, "cpu", torch.float32)
    plan = make_plan(source.num_layers, layers=[2])
    memory = pruned_reference(loaded, plan, windows)
    stream = offload.stream_logprobs(streamed, plan.keep, windows)
    assert (stream - memory).abs().max() < 1e-5


@pytest.mark.parametrize("to", [["--to", "gguf", "--quant", "f16"], ["--to", "onnx", "--fp32"]])
def test_export_verifies_without_the_whole_model(
    tiny_llama_dir, calib_file, tmp_path, capsys, monkeypatch, to
):
    import shortgpt_export.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    out = tmp_path / "out"
    code, stdout, err = run_cli(
        capsys, tiny_llama_dir, "--calib", calib_file, "--out", out, *FAST, "--json",
        "--offload", "layers", "--heal", "linear", "--remove", "2", *to,
    )  # fmt: skip
    assert code == 0, err
    (art,) = json.loads(stdout)["artifacts"]
    verify = art["extra"]["verify"]
    assert verify["kl_divergence"] < 1e-3 and verify["top1_agreement"] > 0.95, verify


def test_no_export_format_loads_the_whole_model_after_streaming(
    tiny_llama_dir, tmp_path, caplog, monkeypatch
):
    """Every format writes from a streamed source without the whole model (a Hugging Face
    folder or ONNX from a GGUF: dequantized tensor by tensor, gguf_to_hf.py); a format
    that converts from memory would load it, with a warning saying so."""
    import shortgpt_export.pipeline as pipeline
    from shortgpt_export.export_options import ExportOptions

    gguf = _tiny_gguf(tiny_llama_dir, tmp_path / "t.gguf", "F32")
    streamed = offload.StreamedModel(gguf, None, "cpu", torch.float32)
    monkeypatch.setattr(pipeline, "_load", lambda *a, **k: "whole model")
    for source in (gguf, resolve_source(str(tiny_llama_dir))):
        export = ExportOptions(formats=["hf", "gguf", "onnx"])
        assert pipeline._after_streamed_scoring(streamed, source, None, export, None) is streamed
    assert "needs the whole model" not in caplog.text
    from_memory = type("Export", (), {"converts_from_memory": lambda self, source: True})()
    got = pipeline._after_streamed_scoring(streamed, gguf, None, from_memory, None)
    assert got == "whole model" and "export from memory needs the whole model" in caplog.text


def test_gguf_source_writes_the_pruned_folder_tensor_by_tensor(
    tiny_tokenizer_dir, calib_file, tmp_path, capsys, monkeypatch
):
    """--offload layers on a GGUF source with --to hf: the folder is dequantized one
    tensor at a time (no whole model) and equals the folder written from the model in
    memory (tensors, config, logits of the loaded folders); a healed plan's patched down
    projection goes in both ways alike."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from shortgpt_export.healing import save_patches
    from shortgpt_export.planning import make_plan
    from shortgpt_export.pruning import write_pruned_model

    folder = build_tiny_model(
        "llama", tiny_tokenizer_dir, tmp_path / "hf", tie_word_embeddings=True
    )
    gguf = _tiny_gguf(folder, tmp_path / "tied.gguf", "Q8_0")

    def same_folders(memory, streamed):
        m_tensors = load_file(memory / "model.safetensors")
        s_tensors = load_file(streamed / "model.safetensors")
        assert sorted(s_tensors) == sorted(m_tensors) and "lm_head.weight" not in s_tensors
        for name, tensor in m_tensors.items():
            scale = float(tensor.abs().max()) or 1.0
            assert float((s_tensors[name] - tensor).abs().max()) <= 1e-5 * scale, name
        configs = [json.loads((f / "config.json").read_text()) for f in (memory, streamed)]
        assert configs[0] == configs[1] and configs[1]["num_hidden_layers"] == 4
        ids = torch.randint(3, 200, (1, 24))
        with torch.inference_mode():
            logits = [
                AutoModelForCausalLM.from_pretrained(f)(ids).logits for f in (memory, streamed)
            ]
        assert (logits[0] - logits[1]).abs().max() < 1e-4
        return m_tensors

    def run(out, offload):
        code, _, err = run_cli(
            capsys, gguf.path, "--calib", calib_file, "--out", out, *FAST, "--to", "hf",
            "--layers", "2,3", "--heal", "none", "--offload", offload,
        )  # fmt: skip
        assert code == 0, err
        return out / "hf"

    memory = run(tmp_path / "m", "none")
    import shortgpt_export.pipeline as pipeline

    with monkeypatch.context() as patched:
        patched.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("model loaded"))
        same_folders(memory, run(tmp_path / "s", "layers"))
    plan = make_plan(gguf.num_layers, layers=[2, 3])
    loaded = load_model(gguf, dtype="float32")
    weight = loaded.model.model.layers[1].mlp.down_proj.weight.detach() * 0.5
    save_patches(tmp_path / "heal.safetensors", gguf.spec, {1: weight})
    plan.patch_file, plan.root = "heal.safetensors", str(tmp_path)
    write_pruned_model(gguf, plan, tmp_path / "pm", loaded=loaded)
    write_pruned_model(gguf, plan, tmp_path / "ps", loaded=None)
    tensors = same_folders(tmp_path / "pm", tmp_path / "ps")
    torch.testing.assert_close(tensors["model.layers.1.mlp.down_proj.weight"], weight)


def test_pickle_checkpoints_cannot_be_streamed():
    fake = type("Source", (), {"kind": "pickle", "ref": "x"})()
    with pytest.raises(ShortGPTError, match="safetensors or GGUF"):
        offload.open_weights(fake)
    assert offload.choose_offload("auto", fake, "cpu", torch.float32) is False
