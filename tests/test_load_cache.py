"""The load cache of GGUF sources: same model and tokenizer, damaged entries rebuilt."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shortgpt_export import load_cache
from shortgpt_export.code_identity import code_identity
from shortgpt_export.source import load_model, resolve_source
from tests.helpers import run_cli

TEXT = "Hello world! <|im_start|>user\nShortGPT removes layers.<|im_end|>"


@pytest.fixture(scope="module")
def tiny_gguf(tiny_llama_dir, tmp_path_factory) -> Path:
    from shortgpt_export.converters import ExportContext
    from shortgpt_export.converters.gguf.hf_to_gguf import convert_pruned
    from shortgpt_export.planning import make_plan

    source = resolve_source(str(tiny_llama_dir))
    target = tmp_path_factory.mktemp("cache-gguf") / "tiny.gguf"
    plan = make_plan(source.num_layers, layers=[1])
    convert_pruned(ExportContext(source=source, plan=plan, out_dir=target.parent), target)
    return target


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "converted"
    monkeypatch.setattr(load_cache, "cache_root", lambda: root)
    monkeypatch.delenv("SHORTGPT_EXPORT_CACHE_SIZE", raising=False)
    return root


def _load(gguf: Path):
    return load_model(resolve_source(str(gguf)), device="cpu", dtype="float32")


def _outputs(loaded):
    tok = loaded.tokenizer
    ids = tok(TEXT)["input_ids"]
    with torch.no_grad():
        logits = loaded.model(torch.tensor([ids])).logits
    stop_ids = loaded.model.generation_config.eos_token_id
    return ids, logits, tok.chat_template, tok.eos_token, stop_ids


def _assert_same(a, b):
    assert a[0] == b[0]  # token ids
    assert torch.equal(a[1], b[1])  # logits, bit for bit
    assert a[2:] == b[2:]  # chat template, EOS token, generation stop ids


def _corrupt(entry: Path, how: str) -> None:
    weights = entry / "model.safetensors"
    if how == "truncated":
        os.truncate(weights, weights.stat().st_size - 100)
    elif how == "bad header":
        with open(weights, "r+b") as fh:
            fh.seek(8)
            fh.write(b"\xff{{")
    elif how == "flipped byte":
        with open(weights, "r+b") as fh:
            fh.seek(weights.stat().st_size - 10)
            byte = fh.read(1)
            fh.seek(-1, 1)
            fh.write(bytes([byte[0] ^ 0x55]))
    elif how == "key mismatch":  # a manifest written for another version of the GGUF
        manifest = json.loads((entry / "manifest.json").read_text())
        manifest["gguf"]["mtime_ns"] -= 1
        (entry / "manifest.json").write_text(json.dumps(manifest))
    elif how == "other converter":  # written by another version of the code or libraries
        manifest = json.loads((entry / "manifest.json").read_text())
        manifest["converter"] = manifest["converter"].replace("transformers ", "transformers 0")
        (entry / "manifest.json").write_text(json.dumps(manifest))
    elif how == "missing file":
        (entry / "tokenizer.json").unlink()


def test_cached_load_equals_the_gguf_load_and_damage_is_rebuilt(tiny_gguf, cache, caplog):
    caplog.set_level("INFO", logger="shortgpt_export")
    uncached = _load(tiny_gguf)
    entry = load_cache.entry_path(tiny_gguf, "float32")
    assert (entry / "manifest.json").is_file()
    # the source config comes from the entry, equal to the one read from the GGUF
    cached_config = load_cache.cached_source_config(tiny_gguf)
    skip = {"_name_or_path", "transformers_version"}
    assert {k: v for k, v in cached_config.to_dict().items() if k not in skip} == {
        k: v for k, v in uncached.source.config.to_dict().items() if k not in skip
    }
    # ... unless the entry was made by another converter (code or library version)
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["converter"] == code_identity()
    real = manifest["converter"]
    manifest["converter"] = "an older version"
    (entry / "manifest.json").write_text(json.dumps(manifest))
    assert load_cache.cached_source_config(tiny_gguf) is None
    manifest["converter"] = real
    (entry / "manifest.json").write_text(json.dumps(manifest))
    caplog.clear()
    cached = _load(tiny_gguf)
    assert "from the load cache" in caplog.text
    expected = _outputs(uncached)
    _assert_same(_outputs(cached), expected)

    pristine = cache.parent / "pristine"
    shutil.copytree(entry, pristine)
    hows = ("bad header", "flipped byte", "key mismatch", "other converter", "missing file")
    for how in (*hows, "truncated"):
        _corrupt(entry, how)
        with pytest.raises(load_cache.CacheEntryError):
            load_cache.check_entry(entry, tiny_gguf, "float32")
        caplog.clear()
        if how != "truncated":  # detected on lookup, deleted, never returned
            assert load_cache.find_entry(tiny_gguf, "float32") is None, how
            assert "not usable" in caplog.text and not entry.exists(), how
            shutil.copytree(pristine, entry)  # whole again, for the next case
            continue
        rebuilt = _load(tiny_gguf)  # the whole path: detected, rebuilt from the GGUF
        assert "not usable" in caplog.text
        assert "from the load cache" not in caplog.text  # never used
        load_cache.check_entry(entry, tiny_gguf, "float32")  # whole again
        _assert_same(_outputs(rebuilt), expected)


def test_a_changed_gguf_gets_a_new_entry(tiny_gguf, cache, tmp_path):
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(tiny_gguf.read_bytes())
    first = load_cache.entry_path(copy, "float32")
    os.utime(copy, ns=(1, 1))
    assert load_cache.entry_path(copy, "float32") != first
    assert load_cache.entry_path(copy, "bfloat16") != load_cache.entry_path(copy, "float32")


def _fake_entry(root: Path, name: str, size: int, used: float) -> None:
    entry = root / name
    entry.mkdir(parents=True)
    (entry / "model.safetensors").write_bytes(b"\0" * size)
    (entry / "manifest.json").write_text(json.dumps({"files": {}, "dtype": "float32"}))
    (entry / load_cache.LAST_USED).touch()
    os.utime(entry / load_cache.LAST_USED, (used, used))


def test_eviction_removes_least_recently_used_first(cache):
    for i, name in enumerate(("old", "mid", "new")):
        _fake_entry(cache, name, 1000, used=1_000_000 + i)
    assert load_cache.evict(2500) == ["old"]
    assert load_cache.evict(1500, keep=cache / "mid") == ["new"]
    assert [e.name for e in load_cache.list_entries()] == ["mid"]


def test_size_setting(monkeypatch):
    for text, expected in (("0", 0), ("500M", 500 * 1024**2), ("2G", 2 * 1024**3), ("1.5k", 1536)):
        monkeypatch.setenv("SHORTGPT_EXPORT_CACHE_SIZE", text)
        assert load_cache.size_limit() == expected
    monkeypatch.setenv("SHORTGPT_EXPORT_CACHE_SIZE", "lots")
    with pytest.raises(load_cache.ShortGPTError, match="lots"):
        load_cache.size_limit()


def test_cache_info_and_clear(capsys, cache):
    _fake_entry(cache, "abc-float32", 2048, used=1_000_000)
    code, out, _ = run_cli(capsys, "cache", "info", "--json")
    assert code == 0
    info = json.loads(out)
    assert [e["name"] for e in info["entries"]] == ["abc-float32"]
    assert info["total_bytes"] > 2048
    code, out, _ = run_cli(capsys, "cache", "clear")
    assert code == 0 and "removed 1" in out
    assert not any(cache.iterdir())


def test_help_and_usage_errors_import_neither_torch_nor_transformers():
    probe = (
        "import sys\n"
        "from shortgpt_export.cli import main\n"
        "for argv in (['--help'], ['--bogus-option'], ['score', '--help'], ['--remove', 'x']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=root
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
