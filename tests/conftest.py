"""Session fixtures: a tiny trained tokenizer and a tiny random model of every family
(built by tiny_models.py)."""

from __future__ import annotations

import os
from pathlib import Path

# before anything imports transformers: tests never use the network
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
from tiny_models import (  # noqa: E402
    CORE_FAMILIES,
    build_tiny_model,
    build_tiny_tokenizer,
    calibration_text,
)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session", params=CORE_FAMILIES)
def tiny_model_dir(request, tiny_tokenizer_dir, tmp_path_factory) -> Path:
    """A saved tiny random model (6 layers, hidden 64) of each family in turn."""
    out = tmp_path_factory.mktemp(f"tiny-{request.param}")
    return build_tiny_model(request.param, tiny_tokenizer_dir, out)


@pytest.fixture(scope="session", params=CORE_FAMILIES)
def tiny_full_attention_dir(request, tiny_tokenizer_dir, tmp_path_factory) -> Path:
    """Like ``tiny_model_dir`` but without sliding-window layers, for llama.cpp parity."""
    out = tmp_path_factory.mktemp(f"tiny-full-{request.param}")
    return build_tiny_model(request.param, tiny_tokenizer_dir, out, full_attention=True)


@pytest.fixture(scope="session")
def family_dirs(tiny_tokenizer_dir, tmp_path_factory):
    """``family -> folder`` of tiny random models, each built once on first use."""
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            out = tmp_path_factory.mktemp(f"family-{family}")
            built[family] = build_tiny_model(family, tiny_tokenizer_dir, out)
        return built[family]

    return get


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_tokenizer_dir, tmp_path_factory) -> Path:
    return build_tiny_model("llama", tiny_tokenizer_dir, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def calib_file(tmp_path) -> str:
    """The built-in calibration text as a file, for --calib."""
    path = tmp_path / "calib.txt"
    path.write_text(calibration_text())
    return str(path)


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    """The cached default model; `make install` fetches it."""
    from shortgpt_export.default_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def known_bpe_tokenizer_dir(default_gguf, tmp_path_factory) -> Path:
    """The default model's byte-level BPE tokenizer (SmolLM2, 49152 tokens), whose
    pre-tokenizer llama.cpp's converter recognises: for families whose converter reads only
    tokenizer.json (OLMo 2, Qwen-MoE)."""
    from shortgpt_export.gguf_tokenizer import tokenizer_from_gguf

    out = tmp_path_factory.mktemp("bpe-tokenizer")
    tokenizer_from_gguf(default_gguf).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def default_gguf_reader(default_gguf):
    """gguf-py's own ``GGUFReader`` of the default model, read once (that takes seconds: it
    maps every string of the 49k vocabulary): the independent reference that our reader
    (``gguf_file.open_gguf``) and our outputs are compared with. Tests only read from it."""
    from gguf import GGUFReader

    return GGUFReader(default_gguf)


@pytest.fixture(scope="session")
def pruned_default_gguf(default_gguf, tmp_path_factory):
    """(plan, source info, path): the default GGUF pruned GGUF -> GGUF without layers
    12, 13, 14 and 17."""
    from shortgpt_export.converters.gguf.prune_gguf import prune_gguf
    from shortgpt_export.planning import make_plan

    plan = make_plan(30, layers=[12, 13, 14, 17])
    out = tmp_path_factory.mktemp("pruned-default") / "pruned.gguf"
    info = prune_gguf(default_gguf, plan, out)
    return plan, info, out


@pytest.fixture(scope="session")
def spm_tokenizer_dir(tmp_path_factory) -> Path:
    """A Gemma-style SentencePiece tokenizer (BPE, byte fallback, vocab 600) trained on the
    built-in calibration text: what llama.cpp's converter needs for Gemma (and Phi-3)."""
    import sentencepiece as spm
    from transformers import GemmaTokenizer

    work = tmp_path_factory.mktemp("spm")
    (work / "text.txt").write_text(calibration_text())
    spm.SentencePieceTrainer.train(
        input=str(work / "text.txt"), model_prefix=str(work / "tokenizer"), vocab_size=600,
        model_type="bpe", byte_fallback=True, character_coverage=1.0,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, minloglevel=2,
    )  # fmt: skip
    out = work / "tokenizer-folder"
    GemmaTokenizer(vocab_file=str(work / "tokenizer.model")).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def _onnx_fp32_store(tmp_path_factory) -> dict:
    return {"root": tmp_path_factory.mktemp("onnx-fp32-store"), "exports": {}}


@pytest.fixture
def shared_onnx_fp32(monkeypatch, _onnx_fp32_store) -> dict:
    """The ONNX back-end's optimum export, run once per HF folder content in the session.

    Runs that write the same pruned HF folder (the same bytes) get a copy of the first
    run's fp32 ONNX folder; everything after it (int8/int4 derivation, verification, model
    cards) runs as usual. Returns ``{"exported": n, "reused": n}`` for this test.
    """
    import shutil

    from helpers import folder_digest

    import shortgpt_export.converters.onnx.exporter as exporter

    real = exporter.export_fp32
    store, counts = _onnx_fp32_store, {"exported": 0, "reused": 0}

    def export_fp32(hf_dir, out):
        key = folder_digest(hf_dir)
        cached = store["exports"].get(key)
        if cached is None:
            real(hf_dir, out)
            cached = store["root"] / key
            shutil.copytree(out, cached)
            store["exports"][key] = cached
            counts["exported"] += 1
        else:
            shutil.copytree(cached, out, dirs_exist_ok=True)
            counts["reused"] += 1

    monkeypatch.setattr(exporter, "export_fp32", export_fp32)
    return counts


@pytest.fixture(scope="session", autouse=True)
def private_reference_cache(tmp_path_factory):
    """Validation's cached reference log-probabilities go to a folder of this test session
    instead of the user's cache (``~/.cache/shortgpt-export/reference``): tests validate
    tiny, patched and deliberately broken models, and an entry one of them left would be
    read by a real run with the same key. (CLI subprocesses started by a test still use the
    user's cache; the tests run the CLI in-process.)"""
    from shortgpt_export.validation import session

    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(session, "cache_dir", lambda: folder)
        yield folder / "reference"


@pytest.fixture(autouse=True)
def torch_threads(request):
    """One torch thread for the tiny models, two for the default model's tests.

    A tiny model's matrices are too small to split, and on 2 shared cores torch's second
    thread mostly waits: test_offload.py + test_streamed_greedy.py took 103 s and 53 s on
    one thread against 329 s and 216 s on two, alternated at load 5-6. Tests that import
    torch later run with torch's default; subprocesses (llama.cpp, validation workers) take
    their own ``--threads``."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(2 if request.node.get_closest_marker("default_model") else 1)


def pytest_collection_modifyitems(items):
    """Mark every test that needs the default model (directly or through a fixture), so
    that `make test-fast` can skip them with ``-m "not default_model"``."""
    for item in items:
        if "default_gguf" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.default_model)
