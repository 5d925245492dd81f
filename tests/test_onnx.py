"""ONNX export: tiny models of every family through onnxruntime, and the default model."""

import json

import pytest
import torch
from helpers import FAST, export_with_cli, run_cli
from tiny_models import calibration_text
from transformers import AutoModelForCausalLM, AutoTokenizer

from shortgpt_export.fidelity import compare_logprobs, torch_logprobs
from shortgpt_export.onnx_runtime import OnnxDecoder

pytest.importorskip("optimum.onnxruntime")


@pytest.fixture(scope="module")
def exported(tiny_full_attention_dir, tmp_path_factory):
    out = export_with_cli(
        tiny_full_attention_dir,
        tmp_path_factory.mktemp("onnx-export"),
        "--to",
        "hf",
        "--fp32",
        "--fp16",
        "--int8",
        "--int4",
        "--int4-block-size",
        "16",
        "--remove",
        "2",
        "--json",
    )
    return tiny_full_attention_dir, out


def windows_for(source, count=3, length=64):
    tokenizer = AutoTokenizer.from_pretrained(source)
    ids = tokenizer(calibration_text(), add_special_tokens=False).input_ids[: count * length]
    return torch.tensor(ids).view(count, length)


def test_fp32_matches_torch_and_cache_is_consistent(exported):
    source, out = exported
    model = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32).eval()
    windows = windows_for(source)
    decoder = OnnxDecoder(out / "onnx-fp32")
    fidelity = compare_logprobs(torch_logprobs(model, windows), decoder.logprobs(windows))
    assert fidelity.max_abs_logprob_diff < 1e-4  # measured ~1e-5
    assert fidelity.top1_agreement == 1.0
    prompt = windows[0, :10].tolist()
    cached = decoder.greedy(prompt, 12, use_cache=True)
    assert cached == decoder.greedy(prompt, 12, use_cache=False)
    torch_greedy = model.generate(
        torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0
    )[0, len(prompt) :].tolist()
    assert cached == torch_greedy


@pytest.mark.parametrize(("precision", "max_kl"), [("fp16", 1e-4), ("int8", 0.05), ("int4", 0.6)])
def test_quantized_folders_stay_within_measured_bounds(exported, precision, max_kl):
    source, out = exported
    model = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32).eval()
    windows = windows_for(source)
    fidelity = compare_logprobs(
        torch_logprobs(model, windows), OnnxDecoder(out / f"onnx-{precision}").logprobs(windows)
    )
    # measured on the tiny random models: fp16 KL ~6e-6, int8 KL 0.003-0.01,
    # int4 (block 16) KL 0.1-0.3
    assert 0 < fidelity.kl_divergence < max_kl
    sizes = {
        p: sum(f.stat().st_size for f in (out / f"onnx-{p}").glob("model.onnx*"))
        for p in ("fp32", precision)
    }
    assert sizes[precision] < sizes["fp32"]


def test_folders_load_with_optimum_and_generate(exported):
    from optimum.onnxruntime import ORTModelForCausalLM

    _, out = exported
    summary_paths = {p.name for p in out.iterdir()}
    assert {"onnx-fp32", "onnx-int8", "onnx-int4", "hf"} <= summary_paths
    for precision in ("fp32", "int8", "int4"):
        folder = out / f"onnx-{precision}"
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = ORTModelForCausalLM.from_pretrained(folder)
        ids = tokenizer("The river delta", return_tensors="pt").input_ids
        generated = model.generate(ids, max_new_tokens=5, do_sample=False)
        assert generated.shape[1] == ids.shape[1] + 5
        card = (folder / "README.md").read_text()
        assert "4 of 6 layers" in card and f"ONNX ({precision})" in card
    assert "block size 16" in (out / "onnx-int4" / "README.md").read_text()


@pytest.mark.parametrize(("mode", "max_kl"), [("dynamic", 1.0), ("weight-only", 0.01)])
def test_default_model_int8(capsys, default_gguf, shared_onnx_fp32, tmp_path, mode, max_kl):
    """Both modes plan the same 26 layers, so the second derives its int8 model from the
    first one's optimum export (shared_onnx_fp32); the rest of the run is its own."""
    from optimum.onnxruntime import ORTModelForCausalLM

    out = tmp_path / "smol"
    code, stdout, err = run_cli(
        capsys, "--int8", "--int8-mode", mode, "--remove", "4", "--out", out, "--json",
        "--heal", "none", "--calib-tokens", "512",  # the export is under test, not the plan
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads(stdout)
    (art,) = [a for a in summary["artifacts"] if a["format"] == "onnx"]
    assert art["quant"] == "int8" and art["layers"] == 26
    assert art["size_bytes"] == sum(p.stat().st_size for p in (out / "onnx-int8").iterdir())
    # measured against the pruned torch model: dynamic (per-tensor int8 activations)
    # KL 0.57, top-1 0.55; weight-only 8-bit KL 0.0011, top-1 0.965
    assert art["extra"]["verify"]["kl_divergence"] < max_kl
    assert not (out / "onnx-fp32").exists() and not (out / ".onnx-work").exists()
    folder = out / "onnx-int8"
    assert not (folder / "tokenizer.model").exists()  # not a stray copy of the GGUF
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = ORTModelForCausalLM.from_pretrained(folder)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    text = tokenizer.decode(
        model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :]
    )
    assert text.strip()


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ("128", "--int4-block-size 128 does not divide the model's hidden_size (64)"),
        ("24", "--int4-block-size 24 is not a power of two"),
    ],
)
def test_bad_int4_block_size(capsys, tiny_llama_dir, tmp_path, block, message):
    code, _, err = run_cli(
        capsys, tiny_llama_dir, "--int4", "--int4-block-size", block, "--out", tmp_path / "o"
    )
    assert code == 2 and message in " ".join(err.split())
    assert not (tmp_path / "o").exists()


def test_interrupted_export_leaves_nothing(capsys, monkeypatch, tiny_llama_dir, tmp_path):
    import shortgpt_export.converters.onnx.exporter as onnx_backend

    def interrupted(fp32_dir, out, precision, **options):
        out.mkdir(parents=True)
        (out / "model.onnx").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_backend, "derive", interrupted)
    calib = tmp_path / "calib.txt"
    calib.write_text(calibration_text())
    code, _, _ = run_cli(
        capsys, tiny_llama_dir, "--int8", "--out", tmp_path / "o", "--calib", calib, *FAST
    )
    assert code == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt"]
