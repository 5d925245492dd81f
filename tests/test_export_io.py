"""The fast paths of the streamed exports write the same bytes as the slow ones."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import gguf
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import TINY_CONFIGS

from shortgpt_export.architectures import spec_for
from shortgpt_export.converters import ExportContext
from shortgpt_export.converters.gguf import hf_to_gguf, tensor_stream, tokenizer
from shortgpt_export.converters.gguf.hf_to_gguf import BlockNameMap, convert_pruned
from shortgpt_export.converters.gguf.packing import fast_writer_class, pack_strings, packed_array
from shortgpt_export.converters.gguf.tokenizer import _special_vocab, merge_strings
from shortgpt_export.errors import ExportError
from shortgpt_export.planning import make_plan
from shortgpt_export.pruning import plan_tensors, source_tensors
from shortgpt_export.safetensors_io import load_tensor, read_header, read_tensor_into
from shortgpt_export.source import resolve_source

TOKENS = ["<|endoftext|>", "Ġthe", "héllo wörld", "", "日本", "a b", *(f"t{i}" for i in range(300))]


def _kv_bytes(writer_class, path, endianess=gguf.GGUFEndian.LITTLE) -> bytes:
    writer = writer_class(path, "llama", endianess=endianess)
    writer.add_token_list(TOKENS)
    writer.add_token_types([gguf.TokenType.NORMAL, gguf.TokenType.CONTROL, 1, 6] * 75)
    writer.add_token_merges(["Ġ t", "h e", "a Ġb"] * 50)
    writer.add_array("test.floats", [0.5, 1.25, -2.0])
    writer.add_array("test.bools", [True, False])
    writer.add_array("test.nested", [[1, 2], [3]])
    writer.add_uint32("test.scalar", 7)
    writer.add_string("test.string", "x y")
    # item types given, as a GGUF -> GGUF rewrite passes them on
    array = gguf.GGUFValueType.ARRAY
    for key, values, item_type in [
        ("test.f32", [0.5, 3, -1e30], gguf.GGUFValueType.FLOAT32),
        ("test.f64", [0.1, 2], gguf.GGUFValueType.FLOAT64),
        ("test.u8", [0, 255, 7], gguf.GGUFValueType.UINT8),
        ("test.i64", [-(2**40), 5], gguf.GGUFValueType.INT64),
        ("test.u16", [1, 65535], gguf.GGUFValueType.UINT16),
        ("test.bool", [False, True, True], gguf.GGUFValueType.BOOL),
        ("test.strings", ["a", "b c"], gguf.GGUFValueType.STRING),
        ("test.mixed", [1, True], gguf.GGUFValueType.INT32),  # left to gguf-py
        ("test.one", [3], gguf.GGUFValueType.UINT32),
    ]:
        writer.add_key_value(key, values, array, sub_type=item_type)
    # every array above but the nested, mixed and one-item ones takes the fast path
    fast = [
        key
        for key, kv in writer.kv_data[0].items()
        if kv.type == array and packed_array(kv.value, kv.sub_type, "<") is not None
    ]
    assert len(fast) == 12, fast
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return path.read_bytes()


@pytest.mark.parametrize("endianess", list(gguf.GGUFEndian))
def test_fast_writer_packs_the_same_bytes_as_gguf(tmp_path, endianess):
    slow = _kv_bytes(gguf.GGUFWriter, tmp_path / "slow.gguf", endianess)
    fast = _kv_bytes(fast_writer_class(), tmp_path / "fast.gguf", endianess)
    assert len(slow) > 3000
    assert fast == slow
    if endianess == gguf.GGUFEndian.BIG:
        return
    # and the reader gets the strings back
    reader = gguf.GGUFReader(tmp_path / "fast.gguf")
    field = reader.fields["tokenizer.ggml.tokens"]
    assert [bytes(field.parts[i]).decode() for i in field.data] == TOKENS


def test_merge_strings_match_gguf_special_vocab(tmp_path):
    pairs = [["Ġ", "t"], ["a b", "c"], ["h", "e  "]]
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"merges": pairs}}))
    expected = gguf.SpecialVocab(tmp_path, load_merges=True).merges
    assert merge_strings(pairs) == expected == ["Ġ t", "aĠb c", "h eĠĠ"]
    assert merge_strings(["a b", "c d"]) == ["a b", "c d"]
    assert merge_strings([["a", "b", "c"]]) is None and merge_strings(None) is None


def test_read_tensor_into_reuses_one_buffer(tiny_llama_dir):
    refs, _ = read_header(tiny_llama_dir / "model.safetensors")
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


def _copied(tiny_llama_dir, path, monkeypatch, calls, order=None):
    """write_safetensors of the tiny model's tensors (a computed one in the middle), with
    the in-kernel copies limited to ``calls``; returns the file's bytes and the calls made."""
    from shortgpt_export import safetensors_io
    from shortgpt_export.safetensors_io import ComputedTensor, write_safetensors

    made = []

    def spy(call):
        def wrapped(src, dst, offset, count):
            made.append(call.__name__)
            return call(src, dst, offset, count)

        wrapped.__name__ = call.__name__
        return wrapped

    monkeypatch.setattr(safetensors_io, "_kernel_copies", lambda: [spy(c) for c in calls])
    refs, _ = read_header(tiny_llama_dir / "model.safetensors")
    items = [refs[name] for name in (order or refs)]
    computed = ComputedTensor("computed", "F32", (3,), lambda: torch.arange(3.0).numpy())
    write_safetensors(path, [*items[:5], computed, *items[5:]], {"format": "pt"})
    written = load_file(path)
    assert torch.equal(written.pop("computed"), torch.arange(3.0))
    original = load_file(tiny_llama_dir / "model.safetensors")
    assert written.keys() == original.keys()
    assert all(torch.equal(written[k], original[k]) for k in original)
    return path.read_bytes(), made


def test_kernel_range_copies_write_what_the_memory_map_writes(
    tiny_llama_dir, tmp_path, monkeypatch
):
    """copy_file_range, sendfile (when the first is refused) and the memory map write the
    same file; tensors adjacent in the source are copied in one call."""
    from shortgpt_export import safetensors_io as sio

    mapped, none = _copied(tiny_llama_dir, tmp_path / "m.safetensors", monkeypatch, [])
    assert none == []
    kernel, made = _copied(tiny_llama_dir, tmp_path / "k.safetensors", monkeypatch,
                           [sio._copy_file_range, sio._sendfile])  # fmt: skip
    assert kernel == mapped
    # file order: the computed tensor splits the run in two spans, one call each
    assert made == ["_copy_file_range"] * 2

    def refused(src, dst, offset, count):
        raise OSError(18, "Invalid cross-device link")

    refused.__name__ = "_copy_file_range"
    fallback, made = _copied(tiny_llama_dir, tmp_path / "s.safetensors", monkeypatch,
                             [refused, sio._sendfile])  # fmt: skip
    assert fallback == mapped and made == ["_copy_file_range", "_sendfile", "_sendfile"]
    refs, _ = read_header(tiny_llama_dir / "model.safetensors")
    backwards = sorted(refs, key=lambda n: -refs[n].start)  # nothing adjacent
    _, made = _copied(tiny_llama_dir, tmp_path / "b.safetensors", monkeypatch,
                      [sio._copy_file_range], order=backwards)  # fmt: skip
    assert len(made) == len(refs)
    # merged runs stop at MERGED_MAX bytes (progress bars follow the copy)
    largest = max(ref.nbytes for ref in refs.values())
    monkeypatch.setattr(sio.RangeCopier, "MERGED_MAX", largest)
    capped, made = _copied(tiny_llama_dir, tmp_path / "c.safetensors", monkeypatch,
                           [sio._copy_file_range])  # fmt: skip
    assert capped == mapped and 2 < len(made) <= len(refs)


def test_a_copy_that_copies_nothing_falls_back_and_other_errors_are_raised(
    tiny_llama_dir, tmp_path, monkeypatch
):
    from shortgpt_export import safetensors_io as sio

    mapped, _ = _copied(tiny_llama_dir, tmp_path / "m.safetensors", monkeypatch, [])

    def nothing(src, dst, offset, count):  # as some FUSE and network file systems answer
        return 0

    nothing.__name__ = "_copy_file_range"
    copied, made = _copied(tiny_llama_dir, tmp_path / "n.safetensors", monkeypatch,
                           [nothing, sio._sendfile])  # fmt: skip
    assert copied == mapped and made == ["_copy_file_range", "_sendfile", "_sendfile"]

    def full(src, dst, offset, count):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        _copied(tiny_llama_dir, tmp_path / "f.safetensors", monkeypatch, [full, sio._sendfile])


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel-copy", "memory-map"])
def test_range_copy_of_a_truncated_source_is_refused(tiny_llama_dir, tmp_path, monkeypatch, kernel):
    from shortgpt_export import safetensors_io
    from shortgpt_export.errors import CorruptModelError
    from shortgpt_export.safetensors_io import write_safetensors

    if not kernel:
        monkeypatch.setattr(safetensors_io, "_kernel_copies", lambda: [])
    source = tmp_path / "model.safetensors"
    shutil.copy(tiny_llama_dir / "model.safetensors", source)
    refs, _ = read_header(source)
    with open(source, "r+b") as fh:  # cut after the header was read
        fh.truncate(source.stat().st_size - 100)
    with pytest.raises(CorruptModelError, match="ends before byte"):
        write_safetensors(tmp_path / "out.safetensors", refs.values())


def _bf16_copy(folder, target):
    """``folder`` with its weights re-saved as bfloat16 (the default model's dtype)."""
    shutil.copytree(folder, target)
    weights = load_file(folder / "model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in weights.items()}, target / "model.safetensors")
    return target


def _export(folder, target, out_type):
    source = resolve_source(str(folder))
    plan = make_plan(source.num_layers, layers=[2])
    convert_pruned(
        ExportContext(source=source, plan=plan, out_dir=target.parent), target, out_type=out_type
    )
    return target.read_bytes()


@pytest.mark.parametrize("out_type", ["F16", "F32"])
def test_chunked_tensor_stream_writes_the_torch_casts(
    tiny_llama_dir, tmp_path, monkeypatch, out_type
):
    folder = _bf16_copy(tiny_llama_dir, tmp_path / "bf16")
    monkeypatch.setattr(hf_to_gguf, "usable_cpus", lambda: 1)  # written in the caller's thread
    whole = _export(folder, tmp_path / "whole.gguf", out_type)
    # q is 4 heads of 1024 elements, k 2: 1000 puts one head in a chunk, 2500 two heads
    # (and splits the 8192-element MLP matrices unevenly); with a writer thread, 1000 puts
    # dozens of chunks in flight through its three buffers
    for cpus in (1, 2):
        monkeypatch.setattr(hf_to_gguf, "usable_cpus", lambda cpus=cpus: cpus)
        for chunk in (1000, 2500):
            monkeypatch.setattr(tensor_stream, "CHUNK_ELEMENTS", chunk)
            assert _export(folder, tmp_path / f"chunk{chunk}-{cpus}.gguf", out_type) == whole

    config = json.loads((folder / "config.json").read_text())
    source = resolve_source(str(folder))
    refs = [
        r
        for r in plan_tensors(source_tensors(folder), source.spec, make_plan(6, layers=[2]))
        if not r.name.endswith("inv_freq")
    ]
    reader = gguf.GGUFReader(tmp_path / "whole.gguf")
    assert len(reader.tensors) == len(refs)
    wide = {"F16": torch.float16, "F32": torch.float32}[out_type]
    for ref, tensor in zip(refs, reader.tensors, strict=True):
        expected = load_tensor(ref)
        for part, heads in (("q_proj", "num_attention_heads"), ("k_proj", "num_key_value_heads")):
            if ref.name.endswith(f"{part}.weight"):
                n = config[heads]
                expected = expected.view(n, 2, -1, expected.shape[1]).transpose(1, 2)
        expected = expected.to(wide if len(ref.shape) > 1 else torch.float32).contiguous()
        assert bytes(tensor.data.tobytes()) == expected.numpy().tobytes(), ref.name
    assert reader.data_offset % 32 == 0 and len(whole) % 32 == 0


def test_pipelined_output_bounds_its_buffers_and_keeps_the_order(tmp_path):
    """Chunks are written in submission order by the writer thread, never more than
    ``depth`` buffers exist, and a buffer is refilled only once written."""
    path = tmp_path / "out.bin"
    created = []
    with (
        open(path, "wb") as fh,
        tensor_stream.TensorOutput(fh.fileno(), 0, 32, pipelined=True, depth=2) as out,
    ):
        for i in range(50):
            raw = out.buffer(1000 - i)  # never grows: the pool's buffers are reused
            created.append(raw._gguf_base.data_ptr())
            raw.fill_(i % 251)
            out.submit(raw)
            out.submit(b"|")
        out.align()
    data = path.read_bytes()
    expected = b"".join(bytes([i % 251]) * (1000 - i) + b"|" for i in range(50))
    assert data[: len(expected)] == expected
    assert len(data) % 32 == 0 and set(data[len(expected) :]) <= {0}
    assert len(set(created)) == 2


def test_pipelined_write_error_reaches_the_caller(tmp_path, monkeypatch):
    calls = []

    def failing_write(fd, view):
        calls.append(len(view))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tensor_stream.os, "write", failing_write)
    with (
        open(tmp_path / "out.bin", "wb") as fh,
        pytest.raises(OSError, match="No space left"),
        tensor_stream.TensorOutput(fh.fileno(), 0, 32, pipelined=True) as out,
    ):
        for _ in range(20):  # the error surfaces at a later buffer() or on exit
            out.submit(out.buffer(4096))
    assert calls == [4096]  # nothing written after the failure
    # an error in the caller's block is not masked by the writer's
    with (
        open(tmp_path / "out.bin", "wb") as fh,
        pytest.raises(ValueError, match="caller"),
        tensor_stream.TensorOutput(fh.fileno(), 0, 32, pipelined=True) as out,
    ):
        out.submit(out.buffer(16))
        raise ValueError("caller")


def test_interrupted_wait_lets_the_writer_finish_first(tmp_path, monkeypatch):
    """Ctrl-C while the block waits for the writer thread: the thread still finishes
    before the caller can close the file, then the interrupt is raised."""
    path = tmp_path / "out.bin"
    with open(path, "wb") as fh:
        out = tensor_stream.TensorOutput(fh.fileno(), 0, 32, pipelined=True)
        thread = out._thread
        real_join, calls = thread.join, []

        def interrupted_join(*args):
            calls.append(thread.is_alive())
            if len(calls) == 1:
                raise KeyboardInterrupt
            return real_join(*args)

        monkeypatch.setattr(thread, "join", interrupted_join)
        with pytest.raises(KeyboardInterrupt), out:
            for i in range(20):
                raw = out.buffer(100_000)
                raw.fill_(i)
                out.submit(raw)
        assert not thread.is_alive() and len(calls) >= 2
    assert path.read_bytes() == b"".join(bytes([i]) * 100_000 for i in range(20))


def test_fast_tokenizer_path_writes_what_stock_gguf_writes(tiny_llama_dir, tmp_path, monkeypatch):
    """One tokenizer.json parse, a slim SpecialVocab folder, numpy packing: the same file as
    gguf-py's own writer, SpecialVocab and merge parsing on the source folder."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, folder)
    (folder / "chat_template.jinja").write_text("{{ messages[0]['content'] }}<|im_end|>")
    fast = _export(folder, tmp_path / "fast.gguf", "F16")
    monkeypatch.setattr(hf_to_gguf, "fast_writer_class", lambda: gguf.GGUFWriter)
    monkeypatch.setattr(tokenizer, "merge_strings", lambda merges: None)
    stock = _export(folder, tmp_path / "stock.gguf", "F16")
    assert fast == stock
    reader = gguf.GGUFReader(tmp_path / "fast.gguf")
    assert "tokenizer.chat_template" in reader.fields


def _plain_token_arrays(vocab, added, size):
    tokens = {i: t for t, i in vocab.items()}
    types = dict.fromkeys(tokens, int(gguf.TokenType.NORMAL))
    for a in added:
        tokens[a["id"]] = a["content"]
        kind = gguf.TokenType.CONTROL if a["special"] else gguf.TokenType.USER_DEFINED
        types[a["id"]] = int(kind)
    return (
        [tokens.get(i, f"[PAD{i}]") for i in range(size)],
        [types.get(i, int(gguf.TokenType.UNUSED)) for i in range(size)],
    )


def test_token_arrays_do_not_depend_on_the_vocabulary_order():
    """The in-order fast path and the general one give what a plain per-id loop gives:
    shuffled ids, a gap, added tokens over the vocabulary and beyond it."""
    import random

    ordered = {f"t{i}": i for i in range(40)}
    added = [
        {"id": 3, "content": "<s>", "special": True},
        {"id": 40, "content": "<user>", "special": False},
    ]
    shuffled = list(ordered.items())
    random.Random(0).shuffle(shuffled)
    gapped = {t: i for t, i in ordered.items() if i != 7}
    for vocab in (ordered, dict(shuffled), gapped):
        for vocab_size in (10, 48):
            got = tokenizer.token_arrays(vocab, added, vocab_size, Path("t.json"))
            size = max(vocab_size, 41)  # 41 .. 47 of 48 have no token, nor 7 when gapped
            assert got == _plain_token_arrays(vocab, added, size)
    for ids in ({"a": 0, "b": "1"}, {"a": 0, "b": 1.0}, {"a": 0, "b": True}):
        with pytest.raises(ExportError, match="outside the vocabulary"):
            tokenizer.token_arrays(ids, [], 2, Path("t.json"))


def test_read_json_falls_back_to_the_standard_parser(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text('{"model": {"vocab": {"a": 0}}, "x": NaN}')  # orjson refuses NaN
    data = tokenizer.read_json(path)
    assert data["model"] == {"vocab": {"a": 0}} and data["x"] != data["x"]


def test_special_vocab_without_links_reads_the_folder(tiny_llama_dir, monkeypatch):
    data = json.loads((tiny_llama_dir / "tokenizer.json").read_text())
    linked = _special_vocab(tiny_llama_dir, data, 512)

    def refuse(self, target):
        raise OSError("no symlinks here")

    monkeypatch.setattr(Path, "symlink_to", refuse)
    unlinked = _special_vocab(tiny_llama_dir, data, 512)
    stock = gguf.SpecialVocab(tiny_llama_dir, n_vocab=512)
    for vocab in (linked, unlinked):
        assert vocab.special_token_ids == stock.special_token_ids != {}
        assert vocab.add_special_token == stock.add_special_token
        assert vocab.chat_template == stock.chat_template


@pytest.mark.parametrize(
    "strings",
    [["a", "", "héllo wörld", "日本", "Ġ t"] * 20, ["nul\x00inside", "b", "", "ü"]],
    ids=["joined", "separator-inside"],
)
def test_pack_strings_matches_gguf_per_string_packing(strings):
    expected = b"".join(struct.pack("<Q", len(s.encode())) + s.encode() for s in strings)
    assert pack_strings(strings, "<") == expected
    big = b"".join(struct.pack(">Q", len(s.encode())) + s.encode() for s in strings)
    assert pack_strings(strings, ">") == big


GGUF_FAMILIES = sorted(
    f for f in TINY_CONFIGS if spec_for(f).gguf_arch in gguf.MODEL_ARCH_NAMES.values()
)


@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_block_name_map_names_every_tensor_as_the_full_map(family, family_dirs):
    folder = family_dirs(family)
    spec = spec_for(family)
    config = json.loads((folder / "config.json").read_text())
    layers = config["num_hidden_layers"]
    arch = hf_to_gguf._model_arch(spec.gguf_arch)
    full = gguf.get_tensor_name_map(arch, layers)
    names = BlockNameMap(arch, layers, spec)
    tensors = [*source_tensors(folder), "model.layers.99.self_attn.q_proj.weight", "no.such"]
    found = 0
    for name in tensors:
        expected = full.get_name(name, try_suffixes=(".weight", ".bias"))
        assert names.get_name(name) == expected, name
        found += expected is not None
    assert found > layers  # real names resolve (per-expert MoE tensors may not, in both)
