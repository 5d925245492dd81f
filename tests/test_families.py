"""Issue 13's families: score, plan, prune to HF (config sliced, logits exact), healing
defaults, and which GGUF / ONNX path each takes. One tiny random model per family, built
once per session (conftest.family_dirs); contexts are longer than the sliding windows."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import pytest
import torch
from helpers import logits_of, random_calibration
from tiny_models import CORE_FAMILIES, TINY_CONFIGS

from shortgpt_export.architectures import spec_for, submodule
from shortgpt_export.errors import ExportError, ShortGPTError
from shortgpt_export.healing import check_healable, resolve_heal
from shortgpt_export.planning import make_plan
from shortgpt_export.pruning import prune_config_dict, pruned_view, write_pruned_model
from shortgpt_export.scoring import score_layers
from shortgpt_export.source import resolve_source

FAMILIES = sorted(set(TINY_CONFIGS) - set(CORE_FAMILIES))
REMOVE = [1, 3]
SEQ = 40  # longer than the tiny models' 16-token sliding windows
HEALABLE = {"llama", "mistral", "qwen2", "qwen3", "phi3"}


def load(path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def token_ids(vocab: int, length: int = SEQ, seed: int = 1):
    return torch.randint(3, vocab, (2, length), generator=torch.Generator().manual_seed(seed))


def hand_pruned(model, spec, remove):
    """The pruned model built by hand: blocks dropped, their index attributes and the
    config's per-layer list rewritten (the reference write_pruned_model must equal)."""
    layers = spec.decoder_layers(model)
    keep = [i for i in range(len(layers)) if i not in remove]
    kept = torch.nn.ModuleList([layers[i] for i in keep])
    container, _, attr = spec.layers_path.rpartition(".")
    setattr(submodule(model, container), attr, kept)
    for new, block in enumerate(kept):
        for module in block.modules():
            for name in ("layer_idx", "layer_id"):
                if isinstance(getattr(module, name, None), int):
                    setattr(module, name, new)
    model.config.num_hidden_layers = len(keep)
    if isinstance(getattr(model.config, "layer_types", None), list):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    return model


def block_signature(block) -> list:
    """What a block is: its module tree and the attention kind each module was built for."""
    return [
        (name, type(module).__name__, getattr(module, "sliding_window", None),
         getattr(module, "attention_type", None), getattr(module, "is_sliding", None))
        for name, module in block.named_modules()
    ]  # fmt: skip


@pytest.fixture(scope="module")
def pruned_folders(family_dirs, tmp_path_factory):
    """``family -> (source folder, pruned folder)`` with layers 1 and 3 removed."""
    done = {}

    def get(family):
        if family not in done:
            folder = family_dirs(family)
            source = resolve_source(str(folder))
            out = tmp_path_factory.mktemp(f"pruned-{family}") / "hf"
            write_pruned_model(source, make_plan(source.num_layers, layers=REMOVE), out)
            done[family] = folder, out
        return done[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_bi_and_angular_rank_a_planted_identity_block_first(family, family_dirs):
    """Zeroing every matrix of block 2 makes it the identity (attention, MLP, experts and
    SSM mixers all output zero into the residual): both metrics rank it first, Mamba's too."""
    spec = spec_for(family)
    model = load(family_dirs(family))
    with torch.no_grad():
        for param in spec.decoder_layers(model)[2].parameters():
            if param.dim() >= 2:
                param.zero_()
    calib = random_calibration(model.config.vocab_size, rows=2, seq_len=SEQ)
    for metric in ("bi", "angular"):
        scores = score_layers(model, spec, calib, metric=metric, batch_size=2)
        assert len(scores) == model.config.num_hidden_layers
        others = [s for i, s in enumerate(scores) if i != 2]
        assert scores[2] < 1e-3 and min(others) > 20 * scores[2], (metric, scores)
        plan = make_plan(len(scores), scores, remove=1, metric=metric)
        assert plan.remove == [2]


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_folder_and_view_equal_the_hand_pruned_model(family, pruned_folders):
    folder, out = pruned_folders(family)
    spec = spec_for(family)
    original = json.loads((folder / "config.json").read_text())
    config = json.loads((out / "config.json").read_text())
    n = original["num_hidden_layers"]
    keep = [i for i in range(n) if i not in REMOVE]
    assert config["num_hidden_layers"] == len(keep)
    for key, value in original.items():  # every per-layer list is sliced
        if isinstance(value, list) and len(value) == n and key != "layer_types":
            pytest.fail(f"{key} has one entry per layer but is not in per_layer_config_keys")
    if "layer_types" in original:
        assert config["layer_types"] == [original["layer_types"][i] for i in keep]
    reference = hand_pruned(load(folder), spec, REMOVE)
    reloaded = load(out)  # no missing or unexpected tensors
    # every kept block is rebuilt as what it was: dense or MoE, sliding or global
    for new, block in enumerate(spec.decoder_layers(reloaded)):
        assert block_signature(block) == block_signature(spec.decoder_layers(reference)[new])
    x = token_ids(config["vocab_size"])
    expected = logits_of(reloaded, x)
    torch.testing.assert_close(expected, logits_of(reference, x), rtol=0, atol=1e-5)
    # The in-memory view (GGUF sources, verification) equals the folder, also generating
    # with the KV / SSM / RWKV state cache, and leaves the model as it was.
    model = load(folder)
    before = logits_of(model, x)
    assert not torch.allclose(before, expected, atol=1e-3)
    with pruned_view(model, spec, keep) as view:
        torch.testing.assert_close(logits_of(view, x), expected, rtol=0, atol=1e-5)
        gen = view.generate(x[:1, :20], max_new_tokens=4, do_sample=False, pad_token_id=0)
        want = reloaded.generate(x[:1, :20], max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(gen, want)
    torch.testing.assert_close(logits_of(model, x), before, rtol=0, atol=0)


def test_rwkv_block_zero_input_norm_moves_to_the_new_first_block(family_dirs, tmp_path):
    """RWKV's pre_ln lives in blocks.0; removing block 0 must keep it (as blocks.0)."""
    folder = family_dirs("rwkv")
    source = resolve_source(str(folder))
    plan = make_plan(source.num_layers, layers=[0, 2])
    out = write_pruned_model(source, plan, tmp_path / "hf")
    model, reloaded = load(folder), load(out)  # load() fails on a missing pre_ln
    torch.testing.assert_close(
        reloaded.rwkv.blocks[0].pre_ln.weight, model.rwkv.blocks[0].pre_ln.weight
    )
    x = token_ids(model.config.vocab_size)
    with pruned_view(model, source.spec, plan.keep) as view:
        torch.testing.assert_close(logits_of(view, x), logits_of(reloaded, x), rtol=0, atol=1e-5)
    assert not hasattr(model.rwkv.blocks[1], "pre_ln")


def test_config_keys_that_name_layers_by_index_are_rewritten():
    spec = spec_for("qwen2_moe")
    config = {
        "num_hidden_layers": 8,
        "num_experts": 4,
        "decoder_sparse_step": 2,  # sparse: 1, 3, 5, 7
        "mlp_only_layers": [5],  # dense after all
        "max_window_layers": 4,  # full attention below layer 4
    }
    keep = [0, 1, 2, 5, 6, 7]
    new = prune_config_dict(config, spec, keep)
    assert new["num_hidden_layers"] == 6
    assert new["decoder_sparse_step"] == 1
    assert new["mlp_only_layers"] == [0, 2, 3, 4]  # old 0, 2, 5, 6
    assert new["max_window_layers"] == 3  # old 0, 1, 2
    assert prune_config_dict({"num_hidden_layers": 4}, spec, [0, 1]) == {"num_hidden_layers": 2}


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_default_heal_is_linear_where_possible_and_explicit_linear_refused(family, caplog):
    spec = spec_for(family)
    assert spec.healable == (family in HEALABLE)
    with caplog.at_level(logging.WARNING):
        chosen = resolve_heal(spec, "auto")
    if family in HEALABLE:
        assert chosen == "linear" and not caplog.records
        check_healable(spec, "linear")
    else:
        assert chosen == "none"
        assert spec.display_name in caplog.text and "not healing" in caplog.text
        with pytest.raises(ShortGPTError, match="--heal linear cannot patch"):
            resolve_heal(spec, "linear")
    assert resolve_heal(spec, "none") == "none"


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_each_family_names_its_gguf_path(family):
    from shortgpt_export.converters.gguf.exporter import converter_for

    spec = spec_for(family)
    if family == "rwkv":
        for requested in ("auto", "builtin", "llama.cpp"):
            with pytest.raises(ExportError, match="RWKV-6/7"):
                converter_for(spec, requested)
        return
    expected = "builtin" if family in CORE_FAMILIES else "llama.cpp"
    assert converter_for(spec, "auto") == expected
    assert converter_for(spec, "llama.cpp") == "llama.cpp"
    if expected == "llama.cpp":
        with pytest.raises(ExportError, match="built-in GGUF writer does not cover"):
            converter_for(spec, "builtin")


ONNX_REFUSED = {"gemma3_text", "mixtral", "qwen2_moe", "qwen3_moe", "mamba", "mamba2", "rwkv"}


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_onnx_is_refused_with_the_family_named_where_optimum_has_no_export(family):
    pytest.importorskip("optimum.exporters.onnx")
    from shortgpt_export.converters.onnx.build import check_family

    spec = spec_for(family)
    if family in ONNX_REFUSED:
        with pytest.raises(ExportError, match=f"ONNX export of .*{family}"):
            check_family(spec)
    else:
        check_family(spec)


def test_pattern_keeping_removal_is_the_cheapest_valid_one():
    from itertools import combinations

    from shortgpt_export.converters.gguf.attention_pattern import (
        index_pattern,
        keeps_pattern,
        preserving_removal,
    )

    generator = torch.Generator().manual_seed(3)
    for period, n, remove in ((2, 8, 2), (2, 9, 3), (3, 9, 2), (6, 13, 3), (6, 13, 6)):
        pattern = index_pattern(period, n)
        scores = torch.rand(n, generator=generator).tolist()
        valid = [
            list(c)
            for c in combinations(range(n), remove)
            if keeps_pattern(pattern, [i for i in range(n) if i not in c], period)
        ]
        chosen = preserving_removal(pattern, period, remove, scores)
        assert chosen in valid
        assert sum(scores[i] for i in chosen) == pytest.approx(
            min(sum(scores[i] for i in c) for c in valid)
        )


def test_gguf_attention_pattern_is_written_or_the_plan_refused():
    from shortgpt_export.converters.gguf.attention_pattern import check_plan

    config = {
        "num_hidden_layers": 8,
        "layer_types": ["sliding_attention", "full_attention"] * 4,
    }
    scores = [0.5, 0.4, 0.9, 0.1, 0.8, 0.7, 0.6, 0.3]
    breaking = make_plan(8, scores, remove=2)  # layers 3 and 7: shifts 4..6 by one
    assert breaking.remove == [3, 7]
    # a family whose GGUF cannot carry the pattern: the plan is refused and the cheapest
    # pattern-keeping one of the same size named
    index_only = replace(spec_for("gemma2"), gguf_swa_per_layer=False)
    with pytest.raises(ExportError, match=r"Gemma 2 layers onto indices") as error:
        check_plan(index_only, config, breaking)
    assert "--layers 6,7" in error.value.hint  # 0.6 + 0.3: the cheapest pair that keeps it
    assert check_plan(index_only, config, make_plan(8, layers=[6, 7])) is None
    # Gemma 2 itself: llama.cpp reads the per-layer array, so the pruned pattern is written
    kept = check_plan(spec_for("gemma2"), config, breaking)
    assert kept == [True, False, True, True, False, True]  # layers 0, 1, 2, 4, 5, 6
    # Gemma 3: llama.cpp reads a per-layer array, so the pruned pattern is written
    g3 = {"num_hidden_layers": 7, "layer_types": ["sliding_attention"] * 5 + ["full_attention"] * 2}
    assert check_plan(spec_for("gemma3_text"), g3, make_plan(7, layers=[1])) == [
        True, True, True, True, False, False
    ]  # fmt: skip
    assert check_plan(spec_for("phi3"), config, breaking) is None


def _fake_gguf(path, arch: str, blocks: int, **writer_options):
    """A GGUF with only metadata and one small tensor per block (no model to run)."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(path, arch, **writer_options)
    writer.add_block_count(blocks)
    writer.add_head_count_kv([2 + i for i in range(blocks)])  # a per-layer array
    for i in range(blocks):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.full(4, i, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_pruning_slices_per_layer_arrays_and_adds_the_pattern(tmp_path):
    from shortgpt_export.converters.gguf.attention_pattern import add_pattern, pattern_key
    from shortgpt_export.converters.gguf.prune_gguf import prune_gguf
    from shortgpt_export.gguf_file import field_value, open_gguf

    src = _fake_gguf(tmp_path / "src.gguf", "gemma3", 7)
    plan = make_plan(7, layers=[1])
    dst = tmp_path / "dst.gguf"
    prune_gguf(src, plan, dst, arrays={pattern_key("gemma3"): [True] * 4 + [False, True]})
    reader = open_gguf(dst)
    assert field_value(reader, "gemma3.block_count") == 6
    assert field_value(reader, "gemma3.attention.head_count_kv") == [2, 4, 5, 6, 7, 8]
    assert field_value(reader, pattern_key("gemma3")) == [True] * 4 + [False, True]
    norms = {t.name: float(t.data[0]) for t in reader.tensors}
    assert norms == {f"blk.{new}.attn_norm.weight": float(old) for new, old in enumerate(plan.keep)}
    del reader
    add_pattern(dst, "gemma3", [False] * 6)  # replaces, never duplicates, the key
    reader = open_gguf(dst)
    assert field_value(reader, pattern_key("gemma3")) == [False] * 6
    assert len([f for f in reader.fields if f == pattern_key("gemma3")]) == 1
    assert {t.name: float(t.data[0]) for t in reader.tensors} == norms


def test_gguf_pruning_keeps_a_big_endian_source_big_endian_and_its_alignment(tmp_path):
    """Copied tensor bytes keep the source's byte order, so the header is written in it too;
    a healed tensor is written in it; tensors start at the source's alignment."""
    import numpy as np
    from gguf import GGUFEndian, GGUFValueType, GGUFWriter

    from shortgpt_export.converters.gguf.prune_gguf import prune_gguf, write_gguf
    from shortgpt_export.gguf_file import field_value, open_gguf

    src = _fake_gguf(tmp_path / "be.gguf", "llama", 5, endianess=GGUFEndian.BIG)
    assert open_gguf(src).endian == ">"
    dst = tmp_path / "dst.gguf"
    patch = np.array([0.5, -1.5, 2.25, 3.0], dtype=np.float32)
    prune_gguf(src, make_plan(5, layers=[1, 3]), dst, patches={"blk.2.attn_norm.weight": patch})
    reader = open_gguf(dst)
    assert reader.endian == ">"
    assert field_value(reader, "llama.block_count") == 3
    assert field_value(reader, "llama.attention.head_count_kv") == [2, 4, 6]
    values = {t.name: t.data.astype(np.float32).tolist() for t in reader.tensors}
    assert values == {
        "blk.0.attn_norm.weight": [0.0] * 4,
        "blk.1.attn_norm.weight": patch.tolist(),
        "blk.2.attn_norm.weight": [4.0] * 4,
    }
    # a 64-byte alignment carried over: every tensor starts on it
    wide = _fake_gguf(tmp_path / "a64.gguf", "llama", 4)
    src64 = tmp_path / "src64.gguf"
    source = open_gguf(wide)
    fields = [(f.name, f.contents(), f.types[0], (f.types[1:] or (None,))[0])
              for f in source.fields.values() if not f.name.startswith("GGUF.")
              and f.name != "general.architecture"]  # fmt: skip
    fields.append(("general.alignment", 64, GGUFValueType.UINT32, None))
    write_gguf(source, src64, "llama", fields, [(t.name, t) for t in source.tensors])
    prune_gguf(src64, make_plan(4, layers=[0]), dst)
    reader = open_gguf(dst)
    assert [t.start % 64 for t in reader.tensors] == [0, 0, 0]
    assert [float(t.data[0]) for t in reader.tensors] == [1.0, 2.0, 3.0]
    # no tensors (a vocabulary-only file): no padding after the header, as gguf-py writes
    write_gguf(source, tmp_path / "ours.gguf", "llama", fields, [])
    stock = GGUFWriter(tmp_path / "stock.gguf", "llama")
    for key, value, vtype, item_type in fields:
        stock.add_key_value(key, value, vtype, sub_type=item_type)
    stock.data_alignment = 64
    stock.write_header_to_file()
    stock.write_kv_data_to_file()
    stock.write_ti_data_to_file()
    stock.close()
    assert (tmp_path / "ours.gguf").read_bytes() == (tmp_path / "stock.gguf").read_bytes()


@pytest.mark.parametrize(("family", "remove"), [("gemma2", 2), ("gemma3_text", 1)])
def test_gemma_gguf_with_shifted_layers_matches_torch_beyond_the_window(
    family, remove, spm_tokenizer_dir, tmp_path
):
    """The sliding-window trap: the removal moves layers onto indices where llama.cpp's
    index rule (Gemma 2: every 2nd layer global, Gemma 3: every 6th) gives the other kind.
    The GGUF back-end takes llama.cpp's converter for Gemma and writes the pruned pattern;
    llama.cpp then agrees with torch on 64-token windows, four times the 16-token window
    (measured without the pattern: KL 0.21 for Gemma 2, 0.11 for Gemma 3)."""
    pytest.importorskip("llama_cpp")
    from tiny_models import build_tiny_model

    from shortgpt_export.converters import ExportContext
    from shortgpt_export.converters.gguf import GGUFConverter
    from shortgpt_export.converters.gguf.attention_pattern import index_pattern, pattern_key
    from shortgpt_export.converters.gguf.verify import llama_logprobs, llama_model
    from shortgpt_export.export_options import ExportOptions
    from shortgpt_export.fidelity import compare_logprobs, torch_logprobs
    from shortgpt_export.gguf_file import field_value, open_gguf

    folder = build_tiny_model(family, spm_tokenizer_dir, tmp_path / family)
    source = resolve_source(str(folder))
    plan = make_plan(source.num_layers, layers=[remove])
    options = ExportOptions(formats=["gguf"], verify=False)
    ctx = ExportContext(source=source, plan=plan, out_dir=tmp_path / "out", options=options)
    ctx.out_dir.mkdir()
    [artifact] = GGUFConverter().export(ctx)
    hf = write_pruned_model(source, plan, tmp_path / "hf")
    sliding = [
        t == "sliding_attention"
        for t in json.loads((hf / "config.json").read_text())["layer_types"]
    ]
    assert sliding != index_pattern(source.spec.gguf_swa_period, len(plan.keep))  # the trap
    path = ctx.out_dir / artifact.path
    reader = open_gguf(path)
    assert field_value(reader, pattern_key(source.spec.gguf_arch)) == sliding
    del reader
    windows = token_ids(source.config.vocab_size, length=64)
    reference = torch_logprobs(load(hf), windows)
    with llama_model(path, n_ctx=64) as llm:
        fidelity = compare_logprobs(reference, llama_logprobs(llm, windows))
    assert fidelity.kl_divergence <= 0.01, fidelity
    assert fidelity.decisive_top1_agreement >= 0.99, fidelity


@pytest.mark.parametrize(
    ("family", "to", "message"),
    [
        ("rwkv", "gguf", "GGUF export of RWKV-4 (rwkv) is not possible: transformers reads "
         "RWKV-4 checkpoints, and llama.cpp runs only RWKV-6/7"),
        ("mamba", "onnx", "ONNX export of Mamba (mamba) is not possible"),
    ],
)  # fmt: skip
def test_cli_refuses_an_impossible_format_before_any_work(
    family, to, message, family_dirs, capsys, tmp_path, calib_file
):
    from helpers import FAST, run_cli

    code, _, err = run_cli(
        capsys, family_dirs(family), "--calib", calib_file, "--to", to, "--out", tmp_path / "o",
        *FAST,
    )  # fmt: skip
    assert code == 2 and message in " ".join(err.split())
    assert "scoring" not in err and not (tmp_path / "o").exists()


def test_a_gguf_whose_log_probs_are_nan_fails_verification(monkeypatch, tmp_path):
    """llama.cpp computes NaN when an activation overflows F16 (a tiny Mamba with its scan
    inputs scaled up, F16 or Q8_0): NaN compares False with every bound, so the check must
    be written to fail on it, and the hint names F32."""
    from contextlib import nullcontext

    import shortgpt_export.converters.gguf.verify as verify
    from shortgpt_export.converters.gguf.exporter import GGUFConverter

    reference = torch.log_softmax(torch.randn(8, 16, dtype=torch.float64), dim=-1)
    monkeypatch.setattr(verify, "llama_model", lambda path, n_ctx: nullcontext(None))
    monkeypatch.setattr(verify, "llama_logprobs", lambda llm, w: torch.full((8, 16), torch.nan))
    windows = torch.zeros(2, 4, dtype=torch.long)
    backend = GGUFConverter()
    for min_top1, max_kl in (
        (backend.exact_min_top1, backend.exact_max_kl),  # F32/F16 from safetensors
        (0.0, backend.quantized_max_kl),  # quantized
    ):
        with pytest.raises(ExportError, match="disagrees with the torch model") as error:
            verify.verify_gguf(
                tmp_path / "x.gguf", reference, None, windows, min_top1=min_top1, max_kl=max_kl
            )
        assert "past F16's range" in error.value.hint and "--quant F32" in error.value.hint


# Families through llama.cpp's converter, by the tokenizer their tiny model needs, with the
# config changes that make it one llama.cpp runs (Qwen-MoE: all layers sparse, as llama.cpp's
# qwen2moe/qwen3moe graphs have no dense layers). "spm": the tiny SentencePiece tokenizer;
# Mamba's converter reads tokenizer.json first and does not know its pre-tokenizer, so the
# folder keeps only tokenizer.model. "bpe": the converters of OLMo 2 and Qwen-MoE read only
# a tokenizer.json whose pre-tokenizer they recognise: the default model's.
SPM_GGUF = {"phi3": {}, "granite": {}, "mixtral": {}, "mamba": {}, "mamba2": {}}
BPE_GGUF = {
    "olmo2": {},
    "qwen2_moe": {"decoder_sparse_step": 1, "mlp_only_layers": []},
    "qwen3_moe": {"mlp_only_layers": []},
}
NO_TOKENIZER_JSON = {"mamba"}


@pytest.mark.parametrize("family", sorted(SPM_GGUF))
def test_family_gguf_f16_matches_torch_and_q8_0_generates(family, spm_tokenizer_dir, tmp_path):
    check_family_gguf(family, spm_tokenizer_dir, SPM_GGUF[family], tmp_path)


@pytest.mark.parametrize("family", sorted(BPE_GGUF))
def test_bpe_family_gguf_f16_matches_torch_and_q8_0_generates(
    family, known_bpe_tokenizer_dir, tmp_path
):
    check_family_gguf(family, known_bpe_tokenizer_dir, BPE_GGUF[family], tmp_path)


def check_family_gguf(family, tokenizer_dir, overrides, tmp_path, remove=3):
    """llama.cpp's converter on the family's pruned tiny model: the F16 file agrees with the
    pruned torch model on 2 windows of 64 tokens, and the Q8_0 made from it loads, computes
    finite log-probs within the quantized bound and generates. (Layer 3: with layer 1 removed
    the tiny Mixtral's F16 file fails, KL 0.0105, top-1 0.84, because a router near-tie, top-2
    and top-3 expert probabilities 5.5e-5 apart, flips under F16 rounding: torch with F16
    weights and activations gives the same KL 0.0105; F32 agrees.)"""
    pytest.importorskip("llama_cpp")
    from tiny_models import build_tiny_model

    folder = build_tiny_model(family, tokenizer_dir, tmp_path / family, **overrides)
    if family in NO_TOKENIZER_JSON:
        (folder / "tokenizer.json").unlink()
    check_folder_gguf(folder, tmp_path, remove)


def check_folder_gguf(folder, tmp_path, remove):
    """check_family_gguf's checks on the model in ``folder`` with layer ``remove`` removed;
    returns the source, the plan and the F16 file."""
    from shortgpt_export.converters import ExportContext
    from shortgpt_export.converters.gguf import GGUFConverter
    from shortgpt_export.export_options import ExportOptions
    from shortgpt_export.fidelity import QUANTIZED_MAX_KL, compare_logprobs, torch_logprobs
    from shortgpt_export.llama_runtime import llama_logprobs, llama_model

    source = resolve_source(str(folder))
    plan = make_plan(source.num_layers, layers=[remove])
    options = ExportOptions(formats=["gguf"], quants="F16,Q8_0", verify=False)
    ctx = ExportContext(source=source, plan=plan, out_dir=tmp_path / "out", options=options)
    ctx.out_dir.mkdir()
    f16, q8 = (ctx.out_dir / a.path for a in GGUFConverter().export(ctx))
    assert f16.name.endswith("-F16.gguf") and q8.name.endswith("-Q8_0.gguf")
    windows = token_ids(source.config.vocab_size, length=64)
    reference = torch_logprobs(load(write_pruned_model(source, plan, tmp_path / "hf")), windows)
    with llama_model(f16, n_ctx=64) as llm:
        fidelity = compare_logprobs(reference, llama_logprobs(llm, windows))
    assert fidelity.kl_divergence <= 0.01, fidelity
    assert fidelity.decisive_top1_agreement >= 0.99, fidelity
    with llama_model(q8, n_ctx=64) as llm:
        quantized = compare_logprobs(reference, llama_logprobs(llm, windows))
        assert quantized.kl_divergence <= QUANTIZED_MAX_KL, quantized  # NaN fails too
        assert llm("The river", max_tokens=4, temperature=0.0)["usage"]["completion_tokens"] > 0
    family = source.spec.model_type
    print(f"\n{family}: F16 {fidelity}\n{family}: Q8_0 {quantized}")
    return source, plan, f16


def test_moe_only_archs_refuse_kept_dense_layers_before_converting(
    family_dirs, tmp_path, monkeypatch
):
    """llama.cpp's qwen2moe / qwen3moe graphs have experts in every layer (its converter
    fails on a dense layer: "Can not map tensor 'model.layers.0.mlp.down_proj.weight'",
    measured on both): a pruned model that keeps one is refused before any conversion,
    naming the layers and the removal that drops them."""
    import shortgpt_export.converters.gguf.llama_cpp_converter as llama_cpp_converter
    from shortgpt_export.converters import ExportContext
    from shortgpt_export.converters.gguf import GGUFConverter
    from shortgpt_export.converters.gguf.moe_layers import check_dense_layers
    from shortgpt_export.export_options import ExportOptions

    def no_conversion(*args, **kwargs):
        pytest.fail("the converter ran")

    monkeypatch.setattr(llama_cpp_converter, "convert_with_llama_cpp", no_conversion)
    source = resolve_source(str(family_dirs("qwen2_moe")))  # dense 0, 2, 4 (step 2, [4])
    ctx = ExportContext(
        source=source,
        plan=make_plan(6, layers=[1]),
        out_dir=tmp_path,
        options=ExportOptions(formats=["gguf"], verify=False),
    )
    with pytest.raises(ExportError, match=r"Qwen2-MoE \(qwen2_moe\) cannot keep dense-MLP "
                       r"layers \[0, 2, 4\].*qwen2moe graph") as error:  # fmt: skip
        GGUFConverter().export(ctx)
    assert "--layers 0,1,2,4" in error.value.hint
    config = json.loads((family_dirs("qwen2_moe") / "config.json").read_text())
    assert check_dense_layers(source.spec, config, make_plan(6, layers=[0, 2, 4])) is None
    qwen3 = {"num_hidden_layers": 6, "num_experts": 4, "mlp_only_layers": [1]}
    with pytest.raises(ExportError, match=r"Qwen3-MoE .* layers \[1\]"):
        check_dense_layers(spec_for("qwen3_moe"), qwen3, make_plan(6, layers=[3]))
    assert check_dense_layers(spec_for("qwen3_moe"), qwen3, make_plan(6, layers=[1])) is None
    assert check_dense_layers(spec_for("mixtral"), qwen3, make_plan(6, layers=[3])) is None


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_gguf_export_warns_where_llama_cpp_drops_the_sliding_window(family, caplog):
    """llama.cpp's converter writes no sliding window for the llama arch (Mistral, Mixtral)
    nor Qwen: such a GGUF attends to the full context, and the export says so. Gemma and
    Phi-3 GGUFs carry the window: no warning; nor without a window."""
    from shortgpt_export.converters.gguf.attention_pattern import warn_full_attention

    spec = spec_for(family)
    config = {"sliding_window": 16, "max_position_embeddings": 256}
    with caplog.at_level(logging.WARNING):
        window = warn_full_attention(spec, config)
    if family in {"gemma2", "gemma3_text", "phi3"}:
        assert window is None and not caplog.records
    else:
        assert window == 16
        assert (
            f"llama.cpp runs {spec.display_name} ({family}) without its 16-token sliding "
            "window: the GGUF attends to the full context"
        ) in caplog.text
    caplog.clear()
    for quiet in (
        {"sliding_window": None, "max_position_embeddings": 256},
        {"sliding_window": 16, "use_sliding_window": False, "max_position_embeddings": 256},
        {"sliding_window": 4096, "max_position_embeddings": 4096},
        {**config, "layer_types": ["full_attention"] * 4},
    ):
        assert warn_full_attention(spec, quiet) is None
    assert not caplog.records


def test_mixtral_gguf_export_with_a_sliding_window_warns(
    spm_tokenizer_dir, tmp_path, monkeypatch, caplog
):
    """The warning comes from the GGUF back-end, before llama.cpp's converter runs."""
    from tiny_models import build_tiny_model

    import shortgpt_export.converters.gguf.llama_cpp_converter as llama_cpp_converter
    from shortgpt_export.converters import ExportContext
    from shortgpt_export.converters.gguf import GGUFConverter
    from shortgpt_export.export_options import ExportOptions

    class Converted(Exception):
        pass

    def stop(*args, **kwargs):
        raise Converted

    monkeypatch.setattr(llama_cpp_converter, "convert_with_llama_cpp", stop)
    folder = build_tiny_model("mixtral", spm_tokenizer_dir, tmp_path / "m", sliding_window=16)
    source = resolve_source(str(folder))
    options = ExportOptions(formats=["gguf"], verify=False)
    ctx = ExportContext(source, make_plan(6, layers=[1]), tmp_path / "out", options=options)
    ctx.out_dir.mkdir()
    with caplog.at_level(logging.WARNING), pytest.raises(Converted):
        GGUFConverter().export(ctx)
    assert "Mixtral (mixtral) without its 16-token sliding window" in caplog.text


@pytest.mark.parametrize("family", ["gemma2", "granite", "olmo2", "phi3"])
def test_onnx_fp32_of_the_pruned_family_matches_torch(family, pruned_folders, tmp_path):
    """optimum's decoder export of each pruned family agrees with the pruned torch model on
    windows longer than the sliding window, and greedy decoding with the KV cache equals
    decoding without it and torch's."""
    pytest.importorskip("optimum.exporters.onnx")
    from shortgpt_export.converters.onnx.build import export_fp32
    from shortgpt_export.fidelity import compare_logprobs, torch_logprobs
    from shortgpt_export.onnx_runtime import OnnxDecoder

    _, hf = pruned_folders(family)
    export_fp32(hf, tmp_path / "onnx")
    model = load(hf)
    windows = token_ids(model.config.vocab_size)
    decoder = OnnxDecoder(tmp_path / "onnx")
    fidelity = compare_logprobs(torch_logprobs(model, windows), decoder.logprobs(windows))
    print(f"\n{family} ONNX fp32: {fidelity}")
    assert fidelity.max_abs_logprob_diff < 1e-4, fidelity
    assert fidelity.top1_agreement == 1.0, fidelity
    prompt = windows[0, :10].tolist()
    cached = decoder.greedy(prompt, 24, use_cache=True)  # 34 tokens: past the 16-token window
    assert cached == decoder.greedy(prompt, 24, use_cache=False)
    want = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)
    assert cached == want[0, len(prompt) :].tolist()


@pytest.mark.parametrize("family", ["rwkv", "mamba"])
def test_layerwise_runs_of_recurrent_blocks(family, family_dirs):
    """The recording pass (greedy, healing, --offload layers) drives blocks whose loop
    unpacks several outputs (RWKV) or none (Mamba): the streamed scores equal the in-memory
    ones, and a block-by-block run of the pruned stack equals the HF forward."""
    from shortgpt_export import offload
    from shortgpt_export.layerwise import Stack
    from shortgpt_export.source import load_model

    source = resolve_source(str(family_dirs(family)))
    calib = random_calibration(source.config.vocab_size, 4, 24)
    loaded = load_model(source, dtype="float32")
    memory = score_layers(loaded.model, source.spec, calib, batch_size=2)
    streamed = offload.stream_scores(source, calib, dtype=torch.float32, batch_size=2)
    assert streamed == pytest.approx(memory, rel=1e-6)
    keep = [i for i in range(6) if i not in REMOVE]
    stack = Stack(loaded.model, source.spec)
    with torch.inference_mode():
        batch = stack.record(calib, 4)[0]
        hidden = stack.run_many(keep, batch.embeds, batch)
        logits = stack.logits(hidden)
        with pruned_view(loaded.model, source.spec, keep) as pruned:
            want = pruned(input_ids=calib.input_ids).logits
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_block_by_block_logits_are_the_models(family, family_dirs):
    """Healing, greedy selection, the --remove auto budget and the streamed references
    compute logits from the last block's output (layerwise.Stack.logits): the same as
    the model's forward, Gemma 2's soft cap and Granite's logit scaling included."""
    from shortgpt_export.layerwise import Stack
    from shortgpt_export.source import load_model

    source = resolve_source(str(family_dirs(family)))
    loaded = load_model(source, dtype="float32")
    calib = random_calibration(source.config.vocab_size, 2, 24)
    stack = Stack(loaded.model, source.spec)
    with torch.inference_mode():
        batch = stack.record(calib, 2)[0]
        hidden = stack.run_many(range(source.num_layers), batch.embeds, batch)
        logits = stack.logits(hidden)
        want = loaded.model(input_ids=calib.input_ids).logits
        bare = stack.head(stack.norm(hidden))
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
    # the models that transform the head's output are those whose row and config say so
    keys = [key for _, key in source.spec.logit_transforms]
    active = any(getattr(source.config, key, None) is not None for key in keys)
    assert active == (not torch.allclose(bare, want, atol=1e-5)), keys
    assert active == (family in ("gemma2", "granite"))
