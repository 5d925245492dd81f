"""Selection strategies (score, greedy, block), linear healing and the --remove auto budget."""

import json
import math

import numpy as np
import pytest
import torch
from helpers import FAST, export_with_cli, random_calibration
from tiny_models import build_tiny_model

from shortgpt_export.architectures import ArchitectureSpec, spec_for
from shortgpt_export.calibration import load_calibration
from shortgpt_export.errors import ShortGPTError
from shortgpt_export.healing import check_healable, heal_linear, load_patches, removed_runs
from shortgpt_export.layerwise import Stack
from shortgpt_export.planning import Plan, make_plan
from shortgpt_export.pruning import healed, pruned_view
from shortgpt_export.recipe import (
    Recipe,
    choose,
    held_out_perplexity,
    split_calibration,
    subset,
)
from shortgpt_export.scoring import LayerScores, score_layers
from shortgpt_export.selection import (
    block_plan,
    closest_blocks,
    greedy_plan,
    greedy_steps,
    healed_block_plan,
)
from shortgpt_export.source import load_model, resolve_source


def load(folder):
    return load_model(resolve_source(str(folder)), device="cpu", dtype="float32")


def make_identity(model, layers):
    """Zero the attention output and MLP down projections: the block passes its input on."""
    with torch.no_grad():
        for index in layers:
            block = model.model.layers[index]
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()


def calib_for(loaded, tokens=1024, seq_len=64):
    return load_calibration(loaded.tokenizer, None, seq_len=seq_len, max_tokens=tokens)


def scores_of(loaded, calib, metric="bi"):
    values, distances = score_layers(
        loaded.model, loaded.source.spec, calib, metric=metric, blocks=True
    )
    return LayerScores(metric, len(values), values, block_distances=distances)


def test_planted_identity_layer_is_removed_first_by_score_and_greedy(tiny_llama_dir):
    loaded = load(tiny_llama_dir)
    make_identity(loaded.model, [3])
    calib = calib_for(loaded)
    scores = scores_of(loaded, calib)
    assert make_plan(6, scores.scores, remove=1).remove == [3]
    assert scores.scores[3] < 1e-6 < min(s for i, s in enumerate(scores.scores) if i != 3)
    steps = greedy_steps(loaded.model, loaded.source.spec, calib, batch_size=4)
    first, second = next(steps), next(steps)
    steps.close()
    assert first.layer == 3
    assert second.loss >= first.loss
    plan = greedy_plan(6, [first, second], scores.scores, heal=False)
    assert plan.strategy == "greedy" and plan.remove == sorted([3, second.layer])
    assert [s["layer"] for s in plan.selection["steps"]] == [3, second.layer]


def test_greedy_tries_only_the_shortlist_by_score(tiny_llama_dir):
    loaded = load(tiny_llama_dir)
    make_identity(loaded.model, [3])
    calib = calib_for(loaded, tokens=512)
    spec = loaded.source.spec
    scores = scores_of(loaded, calib).scores
    steps = greedy_steps(loaded.model, spec, calib, scores=scores, max_candidates=2)
    assert next(steps).layer == 3
    steps.close()
    # scores that rank the identity layer last: with 2 candidates it is never tried
    misleading = [0.1, 0.2, 0.3, 0.9, 0.4, 0.5]
    steps = greedy_steps(loaded.model, spec, calib, scores=misleading, max_candidates=2)
    first, second = next(steps), next(steps)
    steps.close()
    assert first.layer in (0, 1) and second.layer in (0, 1, 2)


def test_greedy_loss_equals_a_full_forward_of_the_pruned_model(tiny_llama_dir):
    loaded = load(tiny_llama_dir)
    calib = calib_for(loaded, tokens=512)
    step = next(greedy_steps(loaded.model, loaded.source.spec, calib))
    keep = [i for i in range(6) if i != step.layer]
    assert step.loss == pytest.approx(math.log(_perplexity(loaded, calib, keep)), rel=1e-4)


def _perplexity(loaded, calib, keep):
    """Straight HF forward of the pruned view, loss over real next tokens."""
    with torch.no_grad(), pruned_view(loaded.model, loaded.source.spec, keep) as model:
        logits = model(input_ids=calib.input_ids, attention_mask=calib.attention_mask).logits
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        calib.input_ids[:, 1:].reshape(-1),
        reduction="none",
    ).view(calib.input_ids.shape[0], -1)
    mask = calib.attention_mask.bool()
    valid = mask[:, 1:] & mask[:, :-1]
    return math.exp(float(nll[valid].double().mean()))


def test_planted_identity_block_of_two_is_found(tiny_llama_dir):
    loaded = load(tiny_llama_dir)
    make_identity(loaded.model, [2, 3])
    scores = scores_of(loaded, calib_for(loaded, tokens=512))
    plan = block_plan(6, scores.block_distances, 2, scores.scores)
    assert plan.remove == [2, 3] and plan.strategy == "block"
    assert plan.selection["distance"] < 1e-3
    assert min(d for s, d in enumerate(scores.block_distances[1]) if s != 2) > 0.01
    # a block of 1 is the layer's own angular score
    assert scores.block_distances[0][2] < 1e-3


def test_block_distances_match_hidden_states(tiny_llama_dir):
    from helpers import without_final_norm

    loaded = load(tiny_llama_dir)
    calib = random_calibration(400, rows=3, seq_len=16, pad_last=5)
    _, distances = score_layers(loaded.model, loaded.source.spec, calib, blocks=True)
    with torch.no_grad(), without_final_norm(loaded.model):
        states = loaded.model(
            input_ids=calib.input_ids,
            attention_mask=calib.attention_mask,
            output_hidden_states=True,
        ).hidden_states
    real = calib.attention_mask.bool()
    for n in (1, 3):
        for s in (0, 2):
            x, y = states[s].double()[real], states[s + n].double()[real]
            cos = (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))
            want = float((torch.arccos(cos.clamp(-1, 1)) / math.pi).mean())
            assert distances[n - 1][s] == pytest.approx(want, abs=1e-5)


def test_healed_block_choice_ranks_candidates_by_held_out_loss(tiny_llama_dir):
    loaded = load(tiny_llama_dir)
    spec = loaded.source.spec
    calib = calib_for(loaded, tokens=2048)
    scores = scores_of(loaded, calib)
    plan, heal = healed_block_plan(
        loaded.model, spec, calib, scores.block_distances, 2, scores.scores, candidates=3
    )
    candidates = plan.selection["candidates"]
    starts = [c["start"] for c in candidates]
    assert sorted(starts) == sorted(closest_blocks(scores.block_distances, 2, 3))
    # each candidate's loss, measured again through the pruned, healed HF model on the
    # guard's held-out windows (every 4th batch of 4 windows)
    rows = calib.input_ids.shape[0]
    held = [r for r in range(rows) if (r // 4) % 4 == 3]
    windows = subset(calib, held)
    for c in candidates:
        remove = list(range(c["start"], c["start"] + 2))
        keep = [i for i in range(6) if i not in remove]
        weights = heal_linear(loaded.model, spec, calib, remove).weights
        ppl = held_out_perplexity(loaded, windows, keep, weights, batch_size=4)
        assert c["held_out_loss"] == pytest.approx(math.log(ppl), rel=1e-4)
    best = min(candidates, key=lambda c: c["held_out_loss"])
    assert plan.remove == [best["start"], best["start"] + 1] and plan.strategy == "block"
    assert sorted(heal.weights) == ([best["start"] - 1] if heal.weights else [])
    # through the recipe: the plan's heal is the one made while choosing, not a second fit
    choice = choose(
        loaded, calib, scores, Recipe(select="block", heal="linear", block_candidates=3), remove=2
    )
    assert choice.plan.remove == plan.remove
    assert choice.heal.runs == heal.runs


def test_healing_on_few_tokens_per_dimension_warns(tiny_llama_dir, caplog):
    loaded = load(tiny_llama_dir)
    hidden = loaded.model.config.hidden_size
    for tokens, warned in ((hidden * 8, True), (hidden * 32, False)):
        caplog.clear()
        calib = calib_for(loaded, tokens=tokens)
        heal_linear(loaded.model, loaded.source.spec, calib, [2, 3])
        assert ("calibration tokens (< 16 per dimension)" in caplog.text) is warned, tokens


def _run_end_error(loaded, calib, keep, run, weights):
    """|pruned output entering the block after ``run`` - original| / |original|, measured."""
    spec = loaded.source.spec
    stack = Stack(loaded.model, spec)
    a, b = run
    batches = stack.record(calib, 4)
    num = den = 0.0
    with torch.no_grad(), healed(loaded.model, keep, weights):
        for batch in batches:
            y = stack.run_many(range(b + 1), batch.embeds, batch)[batch.mask].double()
            with pruned_view(loaded.model, spec, keep):
                pruned = Stack(loaded.model, spec)
                h = pruned.run_many(range(keep.index(a - 1) + 1), batch.embeds, batch)
            num += float(((h[batch.mask].double() - y) ** 2).sum())
            den += float((y**2).sum())
    return (num / den) ** 0.5


def test_healing_lowers_the_fitted_objective_and_leaves_the_model_unchanged(tiny_llama_dir):
    loaded = load(tiny_llama_dir)
    calib = calib_for(loaded, tokens=2048)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    remove = [0, 2, 3, 5]  # runs 0..0 (no layer before), 2..3 (healed), 5..5 (last)
    result = heal_linear(
        loaded.model, loaded.source.spec, calib, remove, weighting="none", guard=False
    )
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, before[key]), key
    runs = {tuple(r["run"]): r for r in result.runs}
    assert runs[(0, 0)]["patched_layer"] is None and "layer 0" in runs[(0, 0)]["skipped"]
    assert runs[(5, 5)]["patched_layer"] is None and "last layer" in runs[(5, 5)]["skipped"]
    fit = runs[(2, 3)]
    assert fit["patched_layer"] == 1 and list(result.weights) == [1]
    assert fit["residual_after"] < fit["residual_before"]
    keep = [1, 4]
    measured_before = _run_end_error(loaded, calib, keep, (2, 3), None)
    measured_after = _run_end_error(loaded, calib, keep, (2, 3), result.weights)
    assert measured_before == pytest.approx(fit["residual_before"], rel=1e-3)
    assert measured_after == pytest.approx(fit["residual_after"], rel=1e-3)
    assert measured_after < 0.9 * measured_before
    # and it helps where it counts: calibration perplexity of the pruned model
    held = calib_for(loaded, tokens=512)
    plain = held_out_perplexity(loaded, held, keep, None, 4)
    healed_ppl = held_out_perplexity(loaded, held, keep, result.weights, 4)
    assert healed_ppl < plain
    # the default fit weighs tokens by 1/|y|^2; it lowers its own objective too
    weighted = heal_linear(loaded.model, loaded.source.spec, calib, remove, guard=False)
    fit = next(r for r in weighted.runs if r["patched_layer"] == 1)
    assert fit["residual_after"] < fit["residual_before"]
    assert not torch.equal(weighted.weights[1], result.weights[1])


def test_later_fits_see_earlier_patches(tiny_llama_dir):
    loaded = load(tiny_llama_dir)
    calib = calib_for(loaded, tokens=1024)
    both = heal_linear(
        loaded.model, loaded.source.spec, calib, [2, 4], weighting="none", guard=False
    )
    assert [r["patched_layer"] for r in both.runs] == [1, 3]
    second_alone_after_first = _run_end_error(loaded, calib, [0, 1, 3, 5], (4, 4), both.weights)
    assert second_alone_after_first == pytest.approx(both.runs[1]["residual_after"], rel=1e-3)


def _held_loss(loaded, calib, keep, weights, batch_size):
    """Mean next-token loss on the windows heal_linear holds out (every 4th batch)."""
    from shortgpt_export.healing import guard_batch_size, guard_split
    from shortgpt_export.recipe import subset

    rows = calib.input_ids.shape[0]
    size = guard_batch_size(batch_size, rows)
    starts = range(0, rows, size)
    _, held = guard_split(len(starts))
    windows = [i for k in held for i in range(starts[k], min(starts[k] + size, rows))]
    held_set = subset(calib, windows)
    return math.log(held_out_perplexity(loaded, held_set, keep, weights, size))


def test_guard_keeps_a_good_patch_and_rejects_a_bad_one(tiny_llama_dir):
    loaded = load(tiny_llama_dir)
    spec, keep = loaded.source.spec, [0, 1, 4, 5]
    # a good fit: 1,536 tokens for a 64 x 64 map
    good = heal_linear(loaded.model, spec, calib_for(loaded, 2048), [2, 3], weighting="none")
    run = good.runs[0]
    assert run["patched_layer"] == 1 and list(good.weights) == [1]
    assert run["held_out_loss_healed"] < run["held_out_loss_unhealed"]
    calib = calib_for(loaded, 2048)
    assert run["held_out_loss_unhealed"] == pytest.approx(
        _held_loss(loaded, calib, keep, None, 4), rel=1e-4
    )
    assert run["held_out_loss_healed"] == pytest.approx(
        _held_loss(loaded, calib, keep, good.weights, 4), rel=1e-4
    )
    assert good.held_out_tokens == 512 and good.tokens == 1536
    # a bad fit: 16 tokens for a 64 x 64 map and almost no ridge overfits
    tiny = calib_for(loaded, tokens=32, seq_len=16)
    assert tiny.input_ids.shape[0] == 2
    bad = heal_linear(loaded.model, spec, tiny, [2, 3], weighting="none", ridge=1e-9)
    run = bad.runs[0]
    assert bad.weights == {} and run["patched_layer"] is None
    assert run["held_out_loss_healed"] >= run["held_out_loss_unhealed"]
    assert run["skipped"].startswith("guard: held-out loss")
    assert f"{run['held_out_loss_unhealed']:.4f} without" in run["skipped"]
    assert run["residual_after"] < run["residual_before"]  # it did fit its own tokens
    # without the guard the same fit is kept, and it is worse on the held-out windows
    unguarded = heal_linear(
        loaded.model, spec, tiny, [2, 3], weighting="none", ridge=1e-9, guard=False
    )
    assert list(unguarded.weights) == [1]
    assert _held_loss(loaded, tiny, keep, unguarded.weights, 4) > _held_loss(
        loaded, tiny, keep, None, 4
    )


def test_ridge_and_weighting_chosen_by_held_out_loss(tiny_llama_dir):
    loaded = load(tiny_llama_dir)
    calib = calib_for(loaded, 1024)
    result = heal_linear(
        loaded.model, loaded.source.spec, calib, [2, 4], ridge=None, weighting=None
    )
    for run in result.runs:
        tried = run["candidates"]
        assert len(tried) == 6 and {c["weighting"] for c in tried} == {"none", "token"}
        best = min(tried, key=lambda c: c["held_out_loss"])
        assert run["held_out_loss_healed"] == best["held_out_loss"]
        assert (run["ridge"], run["weighting"]) == (best["ridge"], best["weighting"])
    with pytest.raises(ShortGPTError, match="held-out"):
        heal_linear(loaded.model, loaded.source.spec, calib, [2], ridge=None, guard=False)


def test_refit_of_kept_layers_is_measured_and_guarded(tiny_llama_dir):
    loaded = load(tiny_llama_dir)
    spec, keep = loaded.source.spec, [0, 1, 4, 5]
    calib = calib_for(loaded, 2048)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    runs_only = heal_linear(loaded.model, spec, calib, [2, 3], weighting="none")
    deep = heal_linear(loaded.model, spec, calib, [2, 3], weighting="none", refit=True)
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, before[key]), key
    refit = deep.refit
    assert [e["layer"] for e in refit["layers"]] == [1, 4, 5]
    assert refit["held_out_loss_before"] == pytest.approx(
        _held_loss(loaded, calib, keep, runs_only.weights, 4), rel=1e-4
    )
    measured = _held_loss(loaded, calib, keep, deep.weights, 4)
    if refit["kept"]:
        assert refit["held_out_loss_after"] == pytest.approx(measured, rel=1e-4)
        assert measured < refit["held_out_loss_before"]
        changed = {e["layer"] for e in refit["layers"] if e["kept"]}
        assert changed and set(deep.weights) == changed | set(runs_only.weights)
    else:
        assert deep.weights.keys() == runs_only.weights.keys()
    for entry in refit["layers"]:
        assert entry["kept"] == (
            entry["held_out_residual_after"] < entry["held_out_residual_before"]
        )
    # a run ending at the last layer is healed by the refit (its target: the final state)
    last = heal_linear(loaded.model, spec, calib, [4, 5], weighting="none", refit=True)
    assert last.runs[0]["patched_layer"] is None
    assert [e["layer"] for e in last.refit["layers"]] == [3]


def test_runs_and_families_that_cannot_be_healed():
    assert removed_runs([7, 2, 3, 9, 10]) == [(2, 3), (7, 7), (9, 10)]
    for family in ("llama", "mistral", "qwen2", "qwen3"):
        check_healable(spec_for(family), "linear")
    post_norm = ArchitectureSpec("gemma2", "Gemma 2", gguf_arch="gemma2", mlp_feeds_residual=False)
    no_mlp = ArchitectureSpec("mamba", "Mamba", gguf_arch="mamba", mlp_path=None)
    for spec in (post_norm, no_mlp):
        check_healable(spec, "none")
        with pytest.raises(ShortGPTError, match="--heal linear cannot patch .*use --heal none"):
            check_healable(spec, "linear")


@pytest.fixture(scope="module")
def healed_exports(tiny_tokenizer_dir, tmp_path_factory):
    """A tiny llama pruned (run 2..3 healed into layer 1), to hf, GGUF F16 and Q4_0 and ONNX
    fp32; and the same without healing."""
    model_dir = build_tiny_model(
        "llama", tiny_tokenizer_dir, tmp_path_factory.mktemp("llama"), full_attention=True
    )
    common = ("--layers", "2,3", "--to", "hf,gguf,onnx", "--quant", "F16,Q4_0", "--fp32")
    healed_out = export_with_cli(
        model_dir, tmp_path_factory.mktemp("healed"), *common, "--heal", "linear"
    )
    plain_out = export_with_cli(
        model_dir, tmp_path_factory.mktemp("plain"), *common, "--heal", "none"
    )
    return model_dir, healed_out, plain_out


def _healed_torch_logprobs(model_dir, out, windows):
    from shortgpt_export.fidelity import torch_logprobs

    loaded = load(model_dir)
    plan = Plan.load(out / "plan.json")
    with (
        healed(loaded.model, plan.keep, plan.patch_weights(loaded.source.spec)),
        pruned_view(loaded.model, loaded.source.spec, plan.keep) as model,
    ):
        return torch_logprobs(model, windows)


def test_healed_exports_agree_with_the_healed_torch_model(healed_exports):
    from transformers import AutoModelForCausalLM

    from shortgpt_export.fidelity import compare_logprobs, torch_logprobs
    from shortgpt_export.llama_runtime import llama_logprobs, llama_model
    from shortgpt_export.onnx_runtime import OnnxDecoder

    model_dir, out, plain = healed_exports
    plan = json.loads((out / "plan.json").read_text())
    assert (
        plan["patch_file"] == "heal.safetensors" and plan["heal"]["runs"][0]["patched_layer"] == 1
    )
    assert json.loads((out / "hf/config.json").read_text()) == json.loads(
        (plain / "hf/config.json").read_text()
    )
    windows = torch.randint(3, 400, (2, 48), generator=torch.Generator().manual_seed(1))
    reference = _healed_torch_logprobs(model_dir, out, windows)
    hf = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32).eval()
    assert compare_logprobs(reference, torch_logprobs(hf, windows)).max_abs_logprob_diff < 1e-4
    onnx = compare_logprobs(reference, OnnxDecoder(out / "onnx-fp32").logprobs(windows))
    assert onnx.max_abs_logprob_diff < 1e-3
    with llama_model(next(out.glob("*-F16.gguf")), n_ctx=48) as llm:
        gguf = compare_logprobs(reference, llama_logprobs(llm, windows))
    assert gguf.kl_divergence < 1e-4
    # the healed model is a different model from the plain pruned one
    unhealed = AutoModelForCausalLM.from_pretrained(plain / "hf", dtype=torch.float32).eval()
    assert compare_logprobs(reference, torch_logprobs(unhealed, windows)).kl_divergence > 1e-3
    card = (out / "hf/README.md").read_text()
    assert "Healing" in card and "| 2..3 | 1 |" in card


def test_quantized_gguf_keeps_the_healed_down_projection_at_q8_0(healed_exports):
    """Below Q8_0, the patched down projection is written again at Q8_0 from the F16 file's
    values (the export verified the rewritten file in llama.cpp); the rest stays as
    llama.cpp quantized it, and an unhealed export is untouched."""
    import gguf

    from shortgpt_export.converters.gguf.healed_precision import keep_healed_precise
    from shortgpt_export.gguf_file import open_gguf

    _, out, plain = healed_exports
    types = {t.name: t for t in open_gguf(next(out.glob("*-Q4_0.gguf"))).tensors}
    plain_file = open_gguf(next(plain.glob("*-Q4_0.gguf")))
    plain_types = {t.name: t.tensor_type for t in plain_file.tensors}
    q8, q4 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0
    healed = types["blk.1.ffn_down.weight"]
    assert healed.tensor_type == q8 and plain_types["blk.1.ffn_down.weight"] == q4
    assert types["blk.0.ffn_down.weight"].tensor_type == q4
    assert {n: t.tensor_type for n, t in types.items() if n != healed.name} == {
        n: t for n, t in plain_types.items() if n != healed.name
    }
    exact = {t.name: t for t in open_gguf(next(out.glob("*-F16.gguf"))).tensors}
    want = exact[healed.name].data.astype(np.float32)
    got = gguf.quants.dequantize(healed.data, q8)
    assert np.abs(got - want).max() <= np.abs(want).max() / 100  # Q8_0 rounding only
    card = (out / "README.md").read_text()
    assert "healed blk.1.ffn_down.weight at Q8_0" in card
    assert keep_healed_precise(out / "missing", out / "missing", [healed.name], "Q8_0") == []


def test_healed_gguf_source_copies_untouched_tensors_byte_for_byte(
    default_gguf, default_gguf_reader, tmp_path
):
    from shortgpt_export.gguf_file import open_gguf

    # enough calibration tokens for a 576 x 576 fit: on 512 (256 fitted) the held-out guard
    # rightly rejects both overfitted patches (held-out loss 4.46 and 4.65 against 4.33)
    out = export_with_cli(
        default_gguf, tmp_path, "--layers", "12,13,14,20", "--to", "gguf", "--heal", "linear",
        "--calib-tokens", "4096", "--no-verify",  # the bytes are under test here
    )  # fmt: skip
    plan = Plan.load(out / "plan.json")
    weights = load_patches(out / "heal.safetensors", spec_for("llama"))
    # the held-out guard decides per run (each decision is in plan.json)
    runs = {tuple(r["run"]): r for r in plan.heal["runs"]}
    kept = sorted(r["patched_layer"] for r in runs.values() if r["patched_layer"] is not None)
    assert 11 in weights and sorted(weights) == kept
    if 19 not in weights:
        assert runs[(20, 20)]["skipped"].startswith("guard:")
    src = {t.name: t for t in default_gguf_reader.tensors}
    dst = open_gguf(next(out.glob("*.gguf")))
    new_to_old = dict(enumerate(plan.keep))
    patched = 0
    for tensor in dst.tensors:
        name = tensor.name
        if name.startswith("blk."):
            layer = new_to_old[int(name.split(".")[1])]
            name = f"blk.{layer}.{name.split('.', 2)[2]}"
            if name.endswith("ffn_down.weight") and layer in weights:
                assert tensor.tensor_type.name == "F32"
                assert np.array_equal(np.asarray(tensor.data), weights[layer].numpy())
                patched += 1
                continue
        assert tensor.tensor_type == src[name].tensor_type
        assert np.array_equal(tensor.data, src[name].data), name
    assert patched == len(weights)


def own_text(loaded, rows, length):
    """Greedy continuations of random first tokens: text the model predicts well, so that
    every real layer removed costs perplexity."""
    from shortgpt_export.calibration import CalibrationSet

    start = torch.randint(3, 400, (rows, 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ids = loaded.model.generate(
            start,
            attention_mask=torch.ones_like(start),
            max_new_tokens=length - 1,
            min_new_tokens=length - 1,
            do_sample=False,
            pad_token_id=0,
        )
    return CalibrationSet(ids, torch.ones_like(ids), "own", length)


def test_remove_auto_picks_the_most_layers_within_budget(tiny_llama_dir):
    loaded = load(tiny_llama_dir)
    make_identity(loaded.model, [1, 4])  # planted curve: two free layers, then a cliff
    calib = own_text(loaded, rows=16, length=64)
    fit, held = split_calibration(calib, holdout=True)
    assert fit.input_ids.shape[0] + held.input_ids.shape[0] == calib.input_ids.shape[0]
    scores = scores_of(loaded, fit)
    recipe = Recipe(select="score", auto=True, max_ppl_increase=1.001)
    choice = choose(loaded, fit, scores, recipe, held_out=held)
    budget = choice.plan.budget
    n = budget["chosen"]
    assert n == 2 and choice.plan.remove == [1, 4]
    limit = budget["original_perplexity"] * 1.001
    assert _perplexity(loaded, held, choice.plan.keep) <= limit
    worse = make_plan(6, scores.scores, remove=n + 1)
    assert _perplexity(loaded, held, worse.keep) > limit
    assert [c["removed"] for c in budget["curve"]] == [0, 1, 2, 3]


def test_cli_select_heal_and_auto(tiny_llama_dir, tmp_path):
    out = export_with_cli(
        tiny_llama_dir,
        tmp_path,
        "--remove",
        "auto",
        "--max-ppl-increase",
        "50",
        "--select",
        "greedy",
        "--heal",
        "linear",
        "--dry-run",
    )
    plan = json.loads((out / "plan.json").read_text())
    assert plan["strategy"] == "greedy" and plan["budget"]["chosen"] == len(plan["remove"])
    assert (out / "budget.png").is_file()
    assert all(c["perplexity"] <= plan["budget"]["limit"] for c in plan["budget"]["curve"][:-1])
    steps = [s["layer"] for s in plan["selection"]["steps"]]
    assert sorted(steps) == plan["remove"]


def test_cli_greedy_shortlist(tiny_llama_dir, tmp_path):
    out = export_with_cli(
        tiny_llama_dir,
        tmp_path,
        "--remove",
        "2",
        "--select",
        "greedy",
        "--greedy-candidates",
        "2",
        "--heal",
        "none",
        "--dry-run",
    )
    plan = json.loads((out / "plan.json").read_text())
    assert plan["selection"]["shortlist"] == 2
    scores = plan["scores"]
    first = plan["selection"]["steps"][0]["layer"]
    assert first in sorted(range(6), key=lambda i: (scores[i], i))[:2]


def test_cli_heal_refit_records_the_refit(tiny_llama_dir, tmp_path):
    out = export_with_cli(tiny_llama_dir, tmp_path, "--layers", "2,3", "--heal", "refit")
    plan = json.loads((out / "plan.json").read_text())
    heal = plan["heal"]
    assert heal["method"] == "refit" and heal["guard"] is True
    assert [e["layer"] for e in heal["refit"]["layers"]] == [1, 4, 5]
    run = heal["runs"][0]
    assert run["held_out_loss_unhealed"] > 0 and "held_out_loss_healed" in run
    patched = sorted(load_patches(out / "heal.safetensors", spec_for("llama")))
    kept = [e["layer"] for e in heal["refit"]["layers"] if e["kept"]]
    want = set(kept) if heal["refit"]["kept"] else set()
    if run["patched_layer"] is not None:
        want.add(1)
    assert patched == sorted(want)


def test_remove_auto_needs_a_budget(capsys, tiny_llama_dir, tmp_path, calib_file):
    from helpers import run_cli

    code, _, err = run_cli(
        capsys, tiny_llama_dir, "--calib", calib_file, *FAST, "--remove", "auto",
        "--out", tmp_path / "o",
    )  # fmt: skip
    assert code == 2 and "--max-ppl-increase" in err


def test_prune_reapplies_a_healed_plan(capsys, tiny_llama_dir, tmp_path):
    from helpers import run_cli
    from safetensors.torch import load_file

    out = export_with_cli(tiny_llama_dir, tmp_path, "--layers", "2,3", "--heal", "linear")
    code, _, err = run_cli(
        capsys, "prune", tiny_llama_dir, "--plan", out / "plan.json", "--out", tmp_path / "again"
    )
    assert code == 0, err
    first = load_file(str(out / "hf" / "model.safetensors"))
    second = load_file(str(tmp_path / "again" / "hf" / "model.safetensors"))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    patch = load_patches(out / "heal.safetensors", spec_for("llama"))[1]
    assert torch.equal(first["model.layers.1.mlp.down_proj.weight"], patch)
    plain = load_file(str(tiny_llama_dir / "model.safetensors"))
    assert not torch.equal(patch, plain["model.layers.1.mlp.down_proj.weight"])
    assert (tmp_path / "again" / "heal.safetensors").is_file()
