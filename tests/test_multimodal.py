"""Multimodal Gemma 3 checkpoints (Gemma3ForConditionalGeneration): their text model is
scored, pruned and exported as a plain ``gemma3_text`` causal LM; the vision tower is
dropped. Anything else that is not a causal LM keeps the one-line refusal."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from helpers import logits_of, random_calibration, run_cli
from test_families import check_folder_gguf, hand_pruned, load, token_ids
from tiny_models import TINY_TEXT_MODELS

from shortgpt_export.architectures import TEXT_MODELS
from shortgpt_export.planning import make_plan
from shortgpt_export.pruning import write_pruned_model
from shortgpt_export.safetensors_io import read_header
from shortgpt_export.scoring import score_layers
from shortgpt_export.source import load_model, resolve_source

SEQ = 40  # longer than the tiny text model's 16-token sliding window


@pytest.fixture(scope="module")
def multimodal_dir(spm_tokenizer_dir, tmp_path_factory):
    build = TINY_TEXT_MODELS["gemma3"]
    return build(spm_tokenizer_dir, tmp_path_factory.mktemp("gemma3-mm"))


def original_text_model(folder):
    """The checkpoint as transformers loads it: Gemma3ForConditionalGeneration."""
    from transformers import Gemma3ForConditionalGeneration

    model, info = Gemma3ForConditionalGeneration.from_pretrained(
        folder, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def test_text_model_is_loaded_scored_pruned_and_written_as_gemma3_text(
    multimodal_dir, tmp_path, caplog
):
    caplog.set_level("INFO", logger="shortgpt_export.source")
    source = resolve_source(str(multimodal_dir))
    assert source.text_of is TEXT_MODELS["gemma3"]
    assert (source.spec.model_type, source.num_layers) == ("gemma3_text", 7)
    assert "vision tower" in caplog.text and "gemma3_text" in caplog.text
    loaded = load_model(source)
    assert type(loaded.model).__name__ == "Gemma3ForCausalLM"
    original = original_text_model(multimodal_dir)
    x = token_ids(source.config.vocab_size)
    # the text model alone computes what the multimodal model computes on text
    torch.testing.assert_close(logits_of(loaded.model, x), logits_of(original, x), rtol=0, atol=0)

    calib = random_calibration(source.config.vocab_size, rows=2, seq_len=SEQ)
    scores = score_layers(loaded.model, source.spec, calib, metric="bi", batch_size=2)
    plan = make_plan(len(scores), scores, remove=2, metric="bi")
    out = write_pruned_model(source, plan, tmp_path / "hf")

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gemma3_text"
    assert config["architectures"] == ["Gemma3ForCausalLM"]
    assert "vision_config" not in config and "text_config" not in config
    text = original.config.text_config
    assert config["num_hidden_layers"] == 5
    assert config["layer_types"] == [text.layer_types[i] for i in plan.keep]
    names = set(read_header(out / "model.safetensors")[0])
    assert names and all(n.startswith("model.") for n in names), sorted(names)[:5]
    assert {f"model.layers.{i}.self_attn.q_proj.weight" for i in range(5)} <= names
    assert "model.layers.5.self_attn.q_proj.weight" not in names
    assert (out / "tokenizer.model").is_file()
    assert not (out / "preprocessor_config.json").exists()  # the vision tower's

    reloaded = load(out)  # Gemma3ForCausalLM, no missing or unexpected tensors
    assert type(reloaded).__name__ == "Gemma3ForCausalLM"
    layers = replace(source.spec, layers_path="layers")  # inside the language model
    hand_pruned(original.model.language_model, layers, plan.remove)
    torch.testing.assert_close(logits_of(reloaded, x), logits_of(original, x), rtol=0, atol=1e-5)


def test_gguf_of_the_text_model_matches_torch_beyond_the_window(multimodal_dir, tmp_path):
    """The same llama.cpp path as gemma3_text: removing layer 1 shifts the global layer 5
    to index 4, so the pruned pattern must be written (64-token windows, window 16)."""
    from shortgpt_export.converters.gguf.attention_pattern import index_pattern, pattern_key
    from shortgpt_export.gguf_file import field_value, open_gguf

    source, plan, f16 = check_folder_gguf(multimodal_dir, tmp_path, remove=1)
    sliding = [t == "sliding_attention" for t in source.config.layer_types]
    sliding = [sliding[i] for i in plan.keep]
    assert sliding != index_pattern(source.spec.gguf_swa_period, len(plan.keep))  # the trap
    reader = open_gguf(f16)
    assert field_value(reader, "general.architecture") == "gemma3"
    assert field_value(reader, pattern_key("gemma3")) == sliding
    # the text model's tensors only (llama.cpp names vision tensors v.*, mm.*)
    assert {t.name.split(".")[0] for t in reader.tensors} == {"blk", "token_embd", "output_norm"}
    assert field_value(reader, "gemma3.block_count") == 6


def test_a_multimodal_checkpoint_without_a_text_model_row_is_refused(capsys, tmp_path):
    """Llava is neither a causal LM nor a known multimodal wrapper: the one-line refusal."""
    from safetensors.torch import save_file
    from transformers import LlavaConfig

    path = tmp_path / "llava"
    LlavaConfig(architectures=["LlavaForConditionalGeneration"]).save_pretrained(path)
    save_file({"x": torch.zeros(2)}, path / "model.safetensors")
    code, _, err = run_cli(capsys, "score", path, "--out", tmp_path / "o")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "is a 'llava' model, not a decoder-only causal language model" in " ".join(err.split())
    assert not (tmp_path / "o").exists()


def test_the_in_memory_tensor_layout_loads_too_and_missing_text_tensors_are_refused(
    multimodal_dir, tmp_path
):
    """Checkpoints saved as ``model.language_model.*`` (the in-memory names) give the same
    text model; one missing a text-model tensor is refused, not silently re-initialised."""
    import shutil

    from safetensors.torch import load_file, save_file

    from shortgpt_export.errors import CorruptModelError

    tensors = load_file(multimodal_dir / "model.safetensors")
    renamed = {
        name.replace("language_model.model.", "model.language_model.", 1): t
        for name, t in tensors.items()
    }
    assert renamed.keys() != tensors.keys()
    x = token_ids(tensors["language_model.model.embed_tokens.weight"].shape[0])
    want = logits_of(load_model(resolve_source(str(multimodal_dir))).model, x)
    for name, weights in (
        ("new-layout", renamed),
        ("incomplete", {k: v for k, v in renamed.items() if ".layers.2.mlp.up" not in k}),
    ):
        folder = tmp_path / name
        shutil.copytree(multimodal_dir, folder)
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
        source = resolve_source(str(folder))
        if name == "new-layout":
            got = logits_of(load_model(source).model, x)
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        else:
            with pytest.raises(CorruptModelError, match="model.layers.2.mlp.up_proj.weight"):
                load_model(source)


@pytest.mark.parametrize("kind", ["gemma3", "gemma3_text"])
def test_offload_layers_scores_equal_in_memory(kind, multimodal_dir, family_dirs):
    """--offload layers on Gemma 3 (it crashed before: the embedding scale and the local
    rotary embedding are computed buffers, and Gemma 3's loop reads ``block(h)[0]``)."""
    from test_offload import assert_close, both

    source = resolve_source(str(multimodal_dir if kind == "gemma3" else family_dirs(kind)))
    calib = random_calibration(source.config.vocab_size, 5, SEQ, pad_last=5)
    (scores, blocks), (s_scores, s_blocks) = both(source, calib)
    assert len(set(scores)) == len(scores)
    assert_close(s_scores, scores)
    for row, s_row in zip(blocks, s_blocks, strict=True):
        assert_close(s_row, row)
