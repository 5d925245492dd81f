"""GGUF export: tiny models of every family through llama.cpp, and GGUF-to-GGUF pruning."""

import shutil

import numpy as np
import pytest
import torch
from helpers import FAST, export_with_cli, run_cli
from tiny_models import calibration_text
from transformers import AutoModelForCausalLM, AutoTokenizer

from shortgpt_export.converters.gguf.prune_gguf import prune_gguf
from shortgpt_export.converters.gguf.quantize import parse_quant
from shortgpt_export.errors import CorruptModelError, ExportError, ShortGPTError
from shortgpt_export.fidelity import compare_logprobs, torch_logprobs
from shortgpt_export.gguf_file import field_value, gguf_info, open_gguf
from shortgpt_export.llama_runtime import llama_logprobs, llama_model
from shortgpt_export.planning import make_plan
from shortgpt_export.tokenizer_check import check_artifact, gguf_fingerprint, hf_folder_fingerprint

llama_cpp = pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def exported(tiny_full_attention_dir, tmp_path_factory):
    """Each family pruned by 2 layers and exported to F32, F16, Q8_0 and Q4_K_M GGUF."""
    out = export_with_cli(
        tiny_full_attention_dir,
        tmp_path_factory.mktemp("gguf-export"),
        "--to",
        "gguf,hf",
        "--quant",
        "f32,f16,Q8_0",
        "--q4_k_m",
        "--remove",
        "2",
        "--json",
    )
    return tiny_full_attention_dir, out


@pytest.mark.parametrize(("quant", "max_kl"), [("F32", 2e-6), ("F16", 1e-5)])
def test_float_gguf_matches_torch(exported, quant, max_kl):
    source, out = exported
    path = next(out.glob(f"*-pruned4L-{quant}.gguf"))
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32).eval()
    ids = tokenizer(calibration_text(), add_special_tokens=False).input_ids[: 3 * 96]
    windows = torch.tensor(ids).view(3, 96)
    with llama_model(path, n_ctx=96) as llm:
        fidelity = compare_logprobs(torch_logprobs(model, windows), llama_logprobs(llm, windows))
    print(f"\n{source.name} {quant}: {fidelity}")
    # measured on these models: F32 KL 2-5e-7 (llama.cpp keeps its KV cache in F16),
    # F16 KL 1.5-1.8e-6; the only top-1 flips are near-ties (top-2 gap < 0.003 nats)
    assert fidelity.kl_divergence < max_kl
    assert fidelity.decisive_top1_agreement >= 0.99
    assert fidelity.top1_agreement >= (0.99 if quant == "F32" else 0.98)


def test_every_file_loads_generates_and_was_verified(exported):
    _, out = exported
    files = sorted(out.glob("*.gguf"))
    assert [f.name.rsplit("-", 1)[1] for f in files] == [
        "F16.gguf",
        "F32.gguf",
        "Q4_K_M.gguf",
        "Q8_0.gguf",
    ]
    sizes = {f.name.rsplit("-", 1)[1]: f.stat().st_size for f in files}
    assert sizes["Q4_K_M.gguf"] < sizes["Q8_0.gguf"] < sizes["F16.gguf"] < sizes["F32.gguf"]
    for path in files:
        reader = open_gguf(path)
        assert gguf_info(reader).block_count == 4
        with llama_model(path, n_ctx=64) as llm:
            result = llm("The river", max_tokens=6, temperature=0.0)
            assert result["usage"]["completion_tokens"] > 0
    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./") and 'PARAMETER stop "<|endoftext|>"' in modelfile
    card = (out / "README.md").read_text()
    assert "top-1" in card and "Q4_K_M" in card


def test_default_model_gguf_to_gguf_keeps_tensors_byte_identical(
    pruned_default_gguf, default_gguf_reader
):
    plan, info, out = pruned_default_gguf
    assert plan.remove == [12, 13, 14, 17]
    assert info.file_type == "Q4_1" and info.block_count == 30
    src, dst = default_gguf_reader, open_gguf(out)
    assert field_value(dst, "llama.block_count") == 26
    source = {t.name: t for t in src.tensors}
    new_to_old = {new: old for new, old in enumerate(plan.keep)}
    assert len(dst.tensors) == len(src.tensors) - 4 * 9
    for tensor in dst.tensors:
        name = tensor.name
        if name.startswith("blk."):
            index = int(name.split(".")[1])
            name = f"blk.{new_to_old[index]}.{name.split('.', 2)[2]}"
        assert tensor.tensor_type == source[name].tensor_type
        assert np.array_equal(tensor.data, source[name].data), name
    assert field_value(dst, "tokenizer.chat_template") == field_value(
        src, "tokenizer.chat_template"
    )
    with llama_model(out, n_ctx=64) as llm:
        assert llm("Paris is the capital of", max_tokens=4, temperature=0.0)["choices"][0]["text"]


def with_per_layer_arrays(src, dst):
    """Rewrite a GGUF so head counts and feed-forward lengths are per-layer arrays."""
    import gguf

    reader = open_gguf(src)
    arch = gguf_info(reader).arch
    blocks = gguf_info(reader).block_count
    writer = gguf.GGUFWriter(dst, arch)
    as_array = {
        f"{arch}.attention.head_count",
        f"{arch}.attention.head_count_kv",
        f"{arch}.feed_forward_length",
    }
    for field in reader.fields.values():
        if field.name.startswith(("GGUF.", "general.architecture")):
            continue
        value, vtype = field.contents(), field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        if field.name in as_array:
            value, sub, vtype = [value] * blocks, vtype, gguf.GGUFValueType.ARRAY
        writer.add_key_value(field.name, value, vtype, sub_type=sub)
    for tensor in reader.tensors:
        writer.add_tensor_info(
            tensor.name,
            tensor.data.shape,
            tensor.data.dtype,
            tensor.data.nbytes,
            tensor.tensor_type,
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(tensor.data)
    writer.close()


def test_per_layer_arrays_are_sliced_and_the_file_loads(exported, tmp_path):
    source, out = exported
    f16 = next(out.glob("*-F16.gguf"))  # already pruned to 4 layers; prune 1 more
    arrays = tmp_path / "arrays.gguf"
    with_per_layer_arrays(f16, arrays)
    plan = make_plan(4, layers=[2])
    prune_gguf(arrays, plan, tmp_path / "a.gguf")
    prune_gguf(f16, plan, tmp_path / "s.gguf")
    reader = open_gguf(tmp_path / "a.gguf")
    arch = gguf_info(reader).arch
    heads = field_value(reader, f"{arch}.attention.head_count")
    assert isinstance(heads, list) and len(heads) == 3
    assert len(field_value(reader, f"{arch}.feed_forward_length")) == 3
    tokenizer = AutoTokenizer.from_pretrained(source)
    windows = torch.tensor(tokenizer(calibration_text()).input_ids[:64]).view(1, 64)
    with (
        llama_model(tmp_path / "a.gguf", n_ctx=64) as a,
        llama_model(tmp_path / "s.gguf", n_ctx=64) as s,
    ):
        torch.testing.assert_close(llama_logprobs(a, windows), llama_logprobs(s, windows))


def test_gguf_tokenizer_matches_the_source(exported):
    source, out = exported
    f16 = next(out.glob("*-F16.gguf"))
    check_artifact(hf_folder_fingerprint(source), f16)  # raises on any difference


def test_tokenizer_mismatch_is_caught(exported, default_gguf):
    _, out = exported
    f16 = next(out.glob("*-F16.gguf"))
    with pytest.raises(ExportError, match="does not tokenize like the source: text0 "):
        check_artifact(gguf_fingerprint(default_gguf), f16)


@pytest.mark.parametrize(
    ("name", "message"),
    [("q4_k_x", "unknown GGUF quant type 'q4_k_x'"), ("IQ2_XS", "needs an importance matrix")],
)
def test_bad_quant_types(name, message):
    with pytest.raises(ShortGPTError, match=message) as info:
        parse_quant(name)
    if name == "q4_k_x":
        assert "Q4_K_M" in info.value.hint and "IQ2_XS" not in info.value.hint


def test_bad_quant_fails_before_scoring(capsys, tiny_llama_dir, tmp_path, calib_file):
    code, _, err = run_cli(
        capsys,
        tiny_llama_dir,
        "--to",
        "gguf",
        "--quant",
        "q9",
        "--out",
        tmp_path / "o",
        "--calib",
        calib_file,
    )
    assert code == 2 and "unknown GGUF quant type 'q9'" in err and "Q4_K_M" in err


def test_corrupt_and_truncated_gguf(default_gguf, tmp_path):
    truncated = tmp_path / "t.gguf"
    with open(default_gguf, "rb") as src:
        truncated.write_bytes(src.read(5_000_000))
    with pytest.raises(CorruptModelError, match="cannot read GGUF file"):
        prune_gguf(truncated, make_plan(30, layers=[1]), tmp_path / "o.gguf")


def test_interrupted_quantization_leaves_nothing(
    capsys, monkeypatch, tiny_full_attention_dir, tmp_path, calib_file
):
    import shortgpt_export.converters.gguf.exporter as gguf_backend

    def interrupted(src, dst, quant, threads=0):
        dst.write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_backend, "quantize_gguf", interrupted)
    code, _, _ = run_cli(
        capsys,
        tiny_full_attention_dir,
        "--q4_k_m",
        "--out",
        tmp_path / "o",
        "--calib",
        calib_file,
        *FAST,
    )
    assert code == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt"]
    shutil.rmtree(tmp_path / "o", ignore_errors=True)
