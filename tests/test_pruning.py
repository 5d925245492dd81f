import json

import pytest
import torch
from helpers import logits_of
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from shortgpt_export.planning import make_plan
from shortgpt_export.pruning import pruned_view, write_pruned_model
from shortgpt_export.source import resolve_source

REMOVE = [1, 3]


@pytest.fixture(scope="module")
def pruned(tiny_model_dir, tmp_path_factory):
    source = resolve_source(str(tiny_model_dir))
    plan = make_plan(source.num_layers, layers=REMOVE)
    out = tmp_path_factory.mktemp("pruned") / "hf"
    write_pruned_model(source, plan, out, max_shard_bytes=64 * 1024)
    return source, plan, out


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def ids(vocab, length=40, seed=1):
    return torch.randint(3, vocab, (2, length), generator=torch.Generator().manual_seed(seed))


def delete_by_hand(model, remove):
    keep = [i for i in range(model.config.num_hidden_layers) if i not in remove]
    model.model.layers = torch.nn.ModuleList([model.model.layers[i] for i in keep])
    for new, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new
    model.config.num_hidden_layers = len(keep)
    return model


def test_pruned_logits_equal_hand_deleted_model(tiny_model_dir, pruned):
    _, _, out = pruned
    reference = delete_by_hand(load(tiny_model_dir), REMOVE)
    reloaded = load(out)
    x = ids(reference.config.vocab_size)  # longer than the sliding window of 16
    torch.testing.assert_close(logits_of(reloaded, x), logits_of(reference, x), rtol=0, atol=1e-5)
    assert not torch.allclose(logits_of(load(tiny_model_dir), x), logits_of(reloaded, x))


def test_pruned_config_and_tensors_are_consistent(tiny_model_dir, pruned):
    source, plan, out = pruned
    original = json.loads((tiny_model_dir / "config.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == len(plan.keep) == 4
    if "layer_types" in original:
        assert config["layer_types"] == [original["layer_types"][i] for i in plan.keep]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1, "a 64 KiB shard limit must split the model"
    names = set()
    for shard in shards:
        with safe_open(out / shard, "pt") as fh:
            names |= set(fh.keys())
    assert names == set(index["weight_map"])
    layers = {int(n.split(".")[2]) for n in names if n.startswith("model.layers.")}
    assert layers == set(range(4))
    # kept tensors are byte-identical to their source (layer 2 became layer 1)
    with safe_open(tiny_model_dir / "model.safetensors", "pt") as src:
        expected = src.get_tensor("model.layers.2.mlp.up_proj.weight")
    shard = index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    with safe_open(out / shard, "pt") as fh:
        assert torch.equal(fh.get_tensor("model.layers.1.mlp.up_proj.weight"), expected)


def test_tokenizer_and_model_card_travel(tiny_model_dir, pruned):
    _, _, out = pruned
    text = "The river delta is 42 km wide."
    assert (
        AutoTokenizer.from_pretrained(out)(text).input_ids
        == AutoTokenizer.from_pretrained(tiny_model_dir)(text).input_ids
    )
    card = (out / "README.md").read_text()
    assert "| 1 |" in card and "| 3 |" in card and "4 of 6 layers" in card


def test_pruned_view_matches_saved_folder_and_restores(tiny_model_dir, pruned):
    _, plan, out = pruned
    model = load(tiny_model_dir)
    x = ids(model.config.vocab_size, length=12)
    before = logits_of(model, x)
    reloaded = load(out)
    with pruned_view(model, pruned[0].spec, plan.keep) as view:
        assert view.config.num_hidden_layers == 4
        torch.testing.assert_close(logits_of(view, x), logits_of(reloaded, x), rtol=0, atol=1e-5)
        # generation uses the KV cache, which needs contiguous layer_idx
        gen = view.generate(x[:1], max_new_tokens=8, do_sample=False, pad_token_id=0)
        expected = reloaded.generate(x[:1], max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(gen, expected)
    assert model.config.num_hidden_layers == 6
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == list(range(6))
    torch.testing.assert_close(logits_of(model, x), before, rtol=0, atol=0)
