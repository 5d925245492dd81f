"""The fast paths of the streamed exports write the same bytes as the slow ones."""

from __future__ import annotations

import gguf
import torch

from shortgpt_export.converters.gguf.hf_to_gguf import _fast_writer_class
from shortgpt_export.converters.gguf.tokenizer import merge_strings
from shortgpt_export.safetensors_io import read_header, read_tensor_into

TOKENS = ["<|endoftext|>", "Ġthe", "héllo wörld", "", "日本", "a b", *(f"t{i}" for i in range(300))]


def _kv_bytes(writer_class, path) -> bytes:
    writer = writer_class(path, "llama")
    writer.add_token_list(TOKENS)
    writer.add_token_types([gguf.TokenType.NORMAL, gguf.TokenType.CONTROL, 1, 6] * 75)
    writer.add_token_merges(["Ġ t", "h e", "a Ġb"] * 50)
    writer.add_array("test.floats", [0.5, 1.25, -2.0])
    writer.add_array("test.bools", [True, False])
    writer.add_array("test.nested", [[1, 2], [3]])
    writer.add_uint32("test.scalar", 7)
    writer.add_string("test.string", "x y")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return path.read_bytes()


def test_fast_writer_packs_the_same_bytes_as_gguf(tmp_path):
    slow = _kv_bytes(gguf.GGUFWriter, tmp_path / "slow.gguf")
    fast = _kv_bytes(_fast_writer_class(), tmp_path / "fast.gguf")
    assert len(slow) > 3000
    assert fast == slow
    # and the reader gets the strings back
    reader = gguf.GGUFReader(tmp_path / "fast.gguf")
    field = reader.fields["tokenizer.ggml.tokens"]
    assert [bytes(field.parts[i]).decode() for i in field.data] == TOKENS


def test_merge_strings_match_gguf_special_vocab(tmp_path):
    import json

    pairs = [["Ġ", "t"], ["a b", "c"], ["h", "e  "]]
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"merges": pairs}}))
    expected = gguf.SpecialVocab(tmp_path, load_merges=True).merges
    assert merge_strings(pairs) == expected == ["Ġ t", "aĠb c", "h eĠĠ"]
    assert merge_strings(["a b", "c d"]) == ["a b", "c d"]
    assert merge_strings([["a", "b", "c"]]) is None and merge_strings(None) is None


def test_read_tensor_into_reuses_one_buffer(tiny_llama_dir):
    refs, _ = read_header(tiny_llama_dir / "model.safetensors")
    from safetensors.torch import load_file

    expected = load_file(tiny_llama_dir / "model.safetensors")
    buffer = bytearray(max(r.nbytes for r in refs.values()))
    files: dict = {}
    for name, ref in refs.items():
        tensor = read_tensor_into(ref, buffer, files)
        assert tensor.data_ptr() == torch.frombuffer(buffer, dtype=torch.uint8).data_ptr()
        assert torch.equal(tensor, expected[name]), name
    assert len(files) == 1
    for fh in files.values():
        fh.close()
