"""--offload layers: greedy selection one decoder layer at a time equals greedy in memory."""

import json
from contextlib import contextmanager

import pytest
import torch
from helpers import FAST, random_calibration, run_cli

from shortgpt_export import offload
from shortgpt_export.offload import StreamedModel
from shortgpt_export.scoring import score_layers
from shortgpt_export.selection import greedy_steps
from shortgpt_export.source import load_model, resolve_source
from shortgpt_export.streamed_greedy import streamed_greedy_steps

REL = 1e-5


def both(source, calib, batch_size=3, **kwargs):
    """(in-memory steps, streamed steps), every removal down to one layer."""
    loaded = load_model(source, dtype="float32")
    memory = list(greedy_steps(loaded.model, source.spec, calib, batch_size=batch_size, **kwargs))
    streamed = StreamedModel(source, None, "cpu", torch.float32)
    return memory, list(streamed_greedy_steps(streamed, calib, batch_size=batch_size, **kwargs))


def assert_same(streamed, memory):
    assert [s.layer for s in streamed] == [m.layer for m in memory]
    for s, m in zip(streamed, memory, strict=True):
        assert abs(s.loss - m.loss) <= REL * abs(m.loss), (streamed, memory)


def test_streamed_greedy_equals_in_memory_for_every_family(tiny_model_dir):
    source = resolve_source(str(tiny_model_dir))
    # 5 windows in batches of 3, padded rows
    calib = random_calibration(source.config.vocab_size, 5, 24, pad_last=5)
    memory, streamed = both(source, calib)
    assert len(memory) == source.num_layers - 1
    assert len({round(m.loss, 4) for m in memory}) > 1  # the steps differ: not trivial
    assert_same(streamed, memory)


def test_tied_head_and_a_shortlist(family_dirs):
    """Gemma 2 ties its LM head to the embeddings (read from the embedding matrix) and
    scales its embeddings (no row reader); each step tries the 3 lowest-scored layers."""
    source = resolve_source(str(family_dirs("gemma2")))
    calib = random_calibration(source.config.vocab_size, 4, 20, pad_last=3)
    scores = score_layers(load_model(source).model, source.spec, calib)
    memory, streamed = both(source, calib, scores=scores, max_candidates=3)
    assert_same(streamed, memory)
    first = sorted(range(source.num_layers), key=lambda i: (scores[i], i))[:3]
    assert streamed[0].layer in first


@pytest.mark.parametrize("family", ["rwkv", "qwen2_moe"])
def test_recurrent_and_mixture_of_experts_blocks(family, family_dirs):
    """RWKV's blocks hand back extra outputs (recorded per block); Qwen2-MoE's experts."""
    source = resolve_source(str(family_dirs(family)))
    calib = random_calibration(source.config.vocab_size, 4, 16, pad_last=3)
    memory, streamed = both(source, calib)
    assert_same(streamed, memory)


def test_heal_in_the_loop_streams_too_with_spilled_buffers(tiny_llama_dir, tmp_path):
    source = resolve_source(str(tiny_llama_dir))
    calib = random_calibration(source.config.vocab_size, 5, 24, pad_last=5)
    memory, streamed = both(source, calib, heal=True)
    plain = both(source, calib)[0]
    assert [m.layer for m in memory] != [p.layer for p in plain]  # the patches matter
    assert_same(streamed, memory)
    spilled = StreamedModel(source, None, "cpu", torch.float32)
    steps = streamed_greedy_steps(
        spilled, calib, batch_size=3, heal=True, spill=True, spill_dir=tmp_path
    )
    assert_same(list(steps), memory)
    assert list(tmp_path.iterdir()) == []  # the memory-mapped files are removed


def test_one_decoder_layer_in_memory_at_a_time_each_once_per_pass(tiny_llama_dir, monkeypatch):
    source = resolve_source(str(tiny_llama_dir))
    calib = random_calibration(source.config.vocab_size, 4, 16)
    live, most, loads = {}, [0], []
    title = [None]
    real_materialize, real_release = offload.materialize, offload.release

    def materialize(module, prefix, *args):
        real_materialize(module, prefix, *args)
        live[id(module)] = prefix
        loads.append((title[0], prefix))
        most[0] = max(most[0], sum(p.startswith("model.layers.") for p in live.values()))

    def release(module):
        real_release(module)
        assert all(p.is_meta for p in module.parameters())
        del live[id(module)]

    @contextmanager
    def progress(description, total=None):
        title[0] = description
        yield lambda n=1: None
        title[0] = None

    monkeypatch.setattr(offload, "materialize", materialize)
    monkeypatch.setattr(offload, "release", release)
    streamed = StreamedModel(source, None, "cpu", torch.float32)
    steps = list(streamed_greedy_steps(streamed, calib, batch_size=2, progress=progress))
    assert most[0] == 1
    # the norm and the head once, before the first pass; never the embedding matrix
    assert [p for t, p in loads if not p.startswith("model.layers.")] == ["model.norm.", "lm_head."]
    passes: dict[str, list[int]] = {}
    for t, p in loads:
        if p.startswith("model.layers."):
            passes.setdefault(t, []).append(int(p.split(".")[2]))
    assert len(passes) == len(steps) == 5  # one pass per removal, layers in order, each once
    for layers in passes.values():
        assert layers == sorted(set(layers))
    first = next(iter(passes.values()))
    assert first == list(range(6))
    # a later pass loads the kept layers from the earlier removal's position on (stale
    # cached states), or from the second (the first candidate's branch), whichever is first
    removed = [s.layer for s in steps]
    for k, layers in enumerate(list(passes.values())[1:], start=1):
        before = [i for i in range(6) if i not in removed[: k - 1]]
        keep = [i for i in range(6) if i not in removed[:k]]
        assert layers == keep[min(before.index(removed[k - 1]), 1) :]
    # live layers are all released at the end (the head and the norm go with the skeleton)
    assert all(not p.startswith("model.layers.") for p in live.values())


def _plan(capsys, model, calib_file, out, *extra):
    code, _, err = run_cli(
        capsys, model, "--calib", calib_file, "--out", out, *FAST, "--select", "greedy",
        "--heal", "none", "--remove", "2", "--to", "hf", "--dry-run", *extra,
    )  # fmt: skip
    assert code == 0, err
    return json.loads((out / "plan.json").read_text()), " ".join(err.split())


def test_cli_greedy_with_offload_layers_streams_and_chooses_the_same(
    tiny_llama_dir, calib_file, tmp_path, capsys, monkeypatch, caplog
):
    memory, _ = _plan(capsys, tiny_llama_dir, calib_file, tmp_path / "m", "--offload", "none")
    import shortgpt_export.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    streamed, err = _plan(capsys, tiny_llama_dir, calib_file, tmp_path / "s", "--offload", "layers")
    assert "needs the whole model" not in err + caplog.text
    assert streamed["strategy"] == memory["strategy"] == "greedy"
    assert streamed["remove"] == memory["remove"]
    s_steps, m_steps = streamed["selection"]["steps"], memory["selection"]["steps"]
    assert [s["layer"] for s in s_steps] == [m["layer"] for m in m_steps]
    for s, m in zip(s_steps, m_steps, strict=True):
        assert s["loss"] == pytest.approx(m["loss"], rel=REL, abs=2e-6)  # 6 decimals kept
