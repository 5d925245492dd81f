"""Bad and hostile inputs, each crafted here: one line on stderr, exit 2, nothing lost.

Every refusal is checked for: exit code 2, exactly one non-empty line on stderr naming
the problem, no traceback, the source files byte-identical (hashed before and after), and
no temporary folder left anywhere under the test folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import FAST, run_cli

from shortgpt_export.errors import CorruptModelError

TEMP_NAME = re.compile(r"\.(tmp|old)-\d+$|^\.shortgpt-probe-")
REPO = Path(__file__).resolve().parents[1]


def tree_hash(*paths: Path) -> str:
    """sha256 over every file (name and bytes) under ``paths``, links followed."""
    digest = hashlib.sha256()
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for file in files:
            digest.update(str(file).encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if TEMP_NAME.search(p.name)]


@pytest.fixture
def model(tiny_llama_dir, tmp_path) -> Path:
    """A private copy of the tiny llama folder, free to be damaged."""
    return Path(shutil.copytree(tiny_llama_dir, tmp_path / "model"))


def refused(capsys, tmp_path, sources, needle, *argv, only_line=True):
    """Run the CLI; assert the refusal contract; return the error line.

    ``only_line=False`` is for refusals after loading, when progress bars came first.
    """
    before = tree_hash(*sources)
    code, _, err = run_cli(capsys, *argv)
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(errors) == 1, err
    if only_line:
        assert lines == errors, err
    assert needle in errors[0], errors[0]
    assert tree_hash(*sources) == before
    assert leftovers(tmp_path) == []
    return errors[0]


def rewrite_header(path: Path, mutate) -> None:
    """Replace the JSON header of a safetensors file by ``mutate(header)`` (dict or bytes)."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    new = mutate(header)
    raw = new if isinstance(new, bytes) else json.dumps(new).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + length :])


# --- data loss: the output never overlaps an input ------------------------------------


def test_out_is_the_model_folder(capsys, tmp_path, model, calib_file):
    line = refused(
        capsys,
        tmp_path,
        [model],
        "is the model",
        model,
        "--calib",
        calib_file,
        "--out",
        model,
        "--force",
        *FAST,
    )
    assert "--force would delete it" in line


def test_out_is_an_ancestor_of_the_model(capsys, tmp_path, model, calib_file):
    (tmp_path / "sibling.txt").write_text("unrelated")
    refused(
        capsys,
        tmp_path,
        [model, tmp_path / "sibling.txt"],
        "contains the model",
        model,
        "--calib",
        calib_file,
        "--out",
        tmp_path,
        "--force",
        *FAST,
    )


def test_out_inside_the_model_or_holding_the_calibration(capsys, tmp_path, model):
    refused(
        capsys,
        tmp_path,
        [model],
        "lies inside the model",
        "score",
        model,
        "--out",
        model / "scores",
        "--force",
    )
    data = tmp_path / "data"
    data.mkdir()
    calib = data / "calib.txt"
    calib.write_text("some text " * 200)
    refused(
        capsys,
        tmp_path,
        [model, calib],
        "contains the calibration file",
        model,
        "--calib",
        calib,
        "--out",
        data,
        "--force",
        *FAST,
    )


def test_out_through_a_symlink_to_the_model(capsys, tmp_path, model, calib_file):
    link = tmp_path / "link"
    link.symlink_to(model, target_is_directory=True)
    refused(
        capsys,
        tmp_path,
        [model],
        "is the model",
        model,
        "--calib",
        calib_file,
        "--out",
        link,
        "--force",
        *FAST,
    )


def test_validate_out_holding_an_artifact(capsys, tmp_path, model, tiny_llama_dir):
    out = tmp_path / "reports"
    artifact = Path(shutil.copytree(tiny_llama_dir, out / "hf"))
    refused(
        capsys,
        tmp_path,
        [model, artifact],
        "contains the artifact",
        "validate",
        artifact,
        "--reference",
        model,
        "--out",
        out,
        "--force",
    )


def test_out_dot_is_refused(capsys, tmp_path, model, calib_file, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "mine.txt").write_text("keep me")
    monkeypatch.chdir(work)
    refused(
        capsys,
        tmp_path,
        [model, work],
        "is the current folder",
        model,
        "--calib",
        calib_file,
        "--out",
        ".",
        "--force",
        *FAST,
    )


def test_symlinked_out_is_replaced_through_the_link(capsys, tmp_path, model, calib_file):
    target = tmp_path / "real"
    target.mkdir()
    (target / "old.txt").write_text("old run")
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    code, _, err = run_cli(
        capsys, model, "--calib", calib_file, "--out", link, "--force", "--dry-run", *FAST
    )
    assert code == 0, err
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert sorted(p.name for p in target.iterdir()) == ["plan.json"]
    assert leftovers(tmp_path) == []


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporary_folders_are_reclaimed(capsys, tmp_path, model, calib_file):
    stale = tmp_path / f".out.tmp-{dead_pid()}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    alive = tmp_path / f".out.tmp-{os.getppid()}"  # a live process: not ours to remove
    alive.mkdir()
    code, _, err = run_cli(
        capsys, model, "--calib", calib_file, "--out", tmp_path / "out", "--dry-run", *FAST
    )
    assert code == 0, err
    assert not stale.exists() and alive.is_dir()
    assert (tmp_path / "out" / "plan.json").is_file()


# --- hostile GGUF headers: refused at once ----------------------------------------------


def gguf_bytes(n_tensors: int, kvs: bytes = b"", n_kv: int = 0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kvs


def gguf_string(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


HOSTILE_GGUF = {
    "huge key count": (gguf_bytes(0, n_kv=2**60), "key/value count"),
    "huge tensor count": (gguf_bytes(2**50), "tensor count"),
    "huge array": (
        gguf_bytes(0, gguf_string(b"a") + struct.pack("<IIQ", 9, 8, 2**40), n_kv=1),
        "item count of value of 'a'",
    ),
    "huge string": (
        gguf_bytes(0, gguf_string(b"k") + struct.pack("<IQ", 8, 2**62), n_kv=1),
        "length of value of 'k'",
    ),
    "huge key": (gguf_bytes(0, struct.pack("<Q", 2**61) + bytes(16), n_kv=1), "length of key #0"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_GGUF))
def test_hostile_gguf_header(capsys, tmp_path, case):
    data, needle = HOSTILE_GGUF[case]
    path = tmp_path / "crafted.gguf"
    path.write_bytes(data)
    started = time.perf_counter()
    line = refused(capsys, tmp_path, [path], needle, "score", path, "--out", tmp_path / "o")
    # a parser that walked the claimed counts would take hours; the bound leaves room for
    # the CLI's first imports on a busy machine (2 s failed once that way)
    assert time.perf_counter() - started < 10.0
    assert "cannot read GGUF file" in line


def test_prune_gguf_checks_the_header_too(tmp_path):
    from shortgpt_export.gguf_file import open_gguf

    path = tmp_path / "crafted.gguf"
    path.write_bytes(HOSTILE_GGUF["huge array"][0])
    with pytest.raises(CorruptModelError, match="item count"):
        open_gguf(path)


# --- hostile safetensors headers --------------------------------------------------------

Q, OPROJ = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight"


def _set(name, key, value):
    def mutate(header):
        header[name][key] = value
        return header

    return mutate


def _raw(old: bytes, new: bytes):
    def mutate(header):
        return json.dumps(header).encode().replace(old, new, 1)

    return mutate


HOSTILE_SAFETENSORS = {
    "negative shape": (_set(Q, "shape", [-64, -64]), "not non-negative integers"),
    "float shape": (_raw(b'"shape": [64, 64]', b'"shape": [64.0, 64]'), "not non-negative"),
    "infinite shape": (_raw(b'"shape": [64, 64]', b'"shape": [1e400, 64]'), "infinity"),
    "unknown dtype": (_set(Q, "dtype", "F7"), "unknown dtype 'F7'"),
    "past the end": (
        lambda h: {**h, Q: {**h[Q], "data_offsets": [10**12, 10**12 + 16384]}},
        "spans bytes",
    ),
    "overlapping": (
        lambda h: {**h, OPROJ: {**h[OPROJ], "data_offsets": h[Q]["data_offsets"]}},
        "overlap",
    ),
    "NaN in header": (_raw(b'"shape": [64, 64]', b'"shape": [NaN, 64]'), "not strict JSON"),
    "deep nesting": (lambda h: b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nests deeper"),
    "nesting past the limit": (lambda h: b'{"x": [[[[[1]]]]]}', "nests deeper"),
    "huge integer": (_raw(b'"shape": [64, 64]', b'"shape": [' + b"9" * 5000 + b", 64]"), "JSON"),
    "not an object": (lambda h: b"[1, 2]", "not a JSON object"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_SAFETENSORS))
def test_hostile_safetensors_header(capsys, tmp_path, model, case):
    mutate, needle = HOSTILE_SAFETENSORS[case]
    rewrite_header(model / "model.safetensors", mutate)
    line = refused(capsys, tmp_path, [model], needle, "score", model, "--out", tmp_path / "o")
    assert "is not a valid safetensors file" in line


def test_written_headers_are_read_back_by_safetensors(tmp_path, model):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from shortgpt_export.safetensors_io import read_header, write_safetensors

    refs, _ = read_header(model / "model.safetensors")
    write_safetensors(tmp_path / "copy.safetensors", refs.values())
    original = load_file(model / "model.safetensors")
    with safe_open(tmp_path / "copy.safetensors", "pt") as fh:
        assert sorted(fh.keys()) == sorted(refs)
        assert all(torch.equal(fh.get_tensor(k), original[k]) for k in refs)


# --- sharded index and companions ---------------------------------------------------------


def shard_index(model: Path, weight_map_value) -> None:
    from shortgpt_export.safetensors_io import read_header

    refs, _ = read_header(model / "model.safetensors")
    index = {"metadata": {}, "weight_map": {name: weight_map_value for name in refs}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))


def test_index_pointing_outside_the_folder(capsys, tmp_path, model, tiny_llama_dir):
    other = Path(shutil.copytree(tiny_llama_dir, tmp_path / "other"))
    shard_index(model, "../other/model.safetensors")
    refused(
        capsys,
        tmp_path,
        [model, other],
        "is not a plain file name",
        "score",
        model,
        "--out",
        tmp_path / "o",
    )


def test_index_shard_linking_outside_the_folder(capsys, tmp_path, model, tiny_llama_dir):
    other = Path(shutil.copytree(tiny_llama_dir, tmp_path / "other"))
    (model / "shard.safetensors").symlink_to(other / "model.safetensors")
    shard_index(model, "shard.safetensors")
    refused(
        capsys,
        tmp_path,
        [model, other],
        "leads outside the model folder",
        "score",
        model,
        "--out",
        tmp_path / "o",
    )


def test_index_missing_shard_or_not_json(capsys, tmp_path, model):
    shard_index(model, "model-00002-of-00002.safetensors")
    refused(capsys, tmp_path, [model], "is missing", "score", model, "--out", tmp_path / "o")
    (model / "model.safetensors.index.json").write_text("{not json")
    refused(capsys, tmp_path, [model], "not valid JSON", "score", model, "--out", tmp_path / "o")


def test_companion_links_outside_the_folder_are_skipped(tmp_path, model, caplog):
    from shortgpt_export.pruning import copy_companions

    secret = tmp_path / "secret.txt"
    secret.write_text("private key")
    (model / "vocab.txt").symlink_to(secret)
    out = tmp_path / "out"
    out.mkdir()
    copied = copy_companions(model, out)
    assert "vocab.txt" not in copied and not (out / "vocab.txt").exists()
    assert "tokenizer.json" in copied and not (out / "tokenizer.json").is_symlink()
    assert "outside the model folder" in caplog.text


def test_hub_cache_links_into_the_blob_store_are_followed(tmp_path, model):
    from shortgpt_export.pruning import copy_companions, index_shards

    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    for file in model.iterdir():
        blob = repo / "blobs" / hashlib.sha256(file.name.encode()).hexdigest()
        shutil.copy(file, blob)
        (snapshot / file.name).symlink_to(Path("../../blobs") / blob.name)
    shard_index(snapshot, "model.safetensors")
    assert index_shards(snapshot) == [snapshot / "model.safetensors"]
    out = tmp_path / "out"
    out.mkdir()
    assert "tokenizer.json" in copy_companions(snapshot, out)


# --- every other error: one line, exit 2 --------------------------------------------------


def test_bad_layer_list_is_one_line(capsys, tmp_path, model):
    refused(
        capsys,
        tmp_path,
        [model],
        "--layers 'a,b' is not a comma-separated",
        model,
        "--layers",
        "a,b",
    )


def test_markup_in_a_path_is_printed_as_is(capsys, tmp_path):
    line = refused(capsys, tmp_path, [], "[red]x[/red]", "score", tmp_path / "[red]x[/red]")
    assert "does not exist" in line


def test_unwritable_out_is_found_before_loading(capsys, tmp_path, model, calib_file):
    refused(
        capsys,
        tmp_path,
        [model],
        "cannot write into /proc",
        model,
        "--calib",
        calib_file,
        "--out",
        "/proc/shortgpt-test/out",
        *FAST,
    )


def test_score_out_is_an_existing_file(capsys, tmp_path, model):
    taken = tmp_path / "taken"
    taken.write_text("a file")
    refused(
        capsys, tmp_path, [model, taken], "is a file, not a folder", "score", model, "--out", taken
    )


def test_out_name_too_long(capsys, tmp_path, model, calib_file):
    refused(
        capsys,
        tmp_path,
        [model],
        "too long for this file system",
        model,
        "--calib",
        calib_file,
        "--out",
        tmp_path / ("x" * 300),
        *FAST,
    )


def test_config_without_model_type(capsys, tmp_path, model):
    config = json.loads((model / "config.json").read_text())
    del config["model_type"]
    (model / "config.json").write_text(json.dumps(config))
    line = refused(capsys, tmp_path, [model], "has no model_type", "score", model)
    assert len(line) < 300  # not the list of every family transformers knows


def test_single_layer_model(capsys, tmp_path, model):
    config = json.loads((model / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (model / "config.json").write_text(json.dumps(config))
    refused(
        capsys,
        tmp_path,
        [model],
        "at least 2 decoder layers",
        "score",
        model,
        "--out",
        tmp_path / "o",
    )


@pytest.mark.parametrize(
    ("content", "suffix", "needle"),
    [
        (b'{"text": "caf\xe9 au lait, twice over"}\n', ".jsonl", "is not UTF-8 text"),
        (b"\xff\xfe\x00binary" * 20, ".txt", "is not UTF-8 text"),
        (b"tiny", ".txt", "has 4 bytes, too few for 16 tokens"),
        (None, ".txt", "does not exist"),
        ("dir", ".txt", "is not a file"),
        (b'{"text": "a"}\n[1, 2\n', ".jsonl", ":2 is not valid JSON"),
    ],
)
def test_bad_calibration_file_before_loading(capsys, tmp_path, model, content, suffix, needle):
    calib = tmp_path / f"calib{suffix}"
    if content == "dir":
        calib.mkdir()
    elif content is not None:
        calib.write_bytes(content)
    refused(
        capsys, tmp_path, [model], needle, model, "--calib", calib, "--out", tmp_path / "o", *FAST
    )


@pytest.mark.parametrize(
    ("flag", "value", "needle"),
    [
        ("--calib-tokens", "0", "--calib-tokens 0 must be at least 1"),
        ("--seq-len", "1", "--seq-len 1 must be at least 2"),
        ("--batch-size", "-3", "--batch-size -3 must be at least 1"),
        ("--ctx", "0", "argument --ctx: 0 must be at least 1"),
    ],
)
def test_counts_must_be_positive(capsys, tmp_path, model, calib_file, flag, value, needle):
    refused(
        capsys,
        tmp_path,
        [model],
        needle,
        model,
        "--calib",
        calib_file,
        "--out",
        tmp_path / "o",
        *FAST,
        flag,
        value,
    )


def test_nan_scores_stop_the_run(capsys, tmp_path, model, calib_file):
    from safetensors.torch import load_file, save_file

    weights = load_file(model / "model.safetensors")
    weights["model.layers.3.mlp.down_proj.weight"][:] = float("nan")
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "o"
    line = refused(
        capsys,
        tmp_path,
        [model],
        "layer scores are not finite",
        model,
        "--calib",
        calib_file,
        "--out",
        out,
        *FAST,
        only_line=False,
    )
    assert "3=nan" in line and "float32" in line
    assert not out.exists()


@pytest.mark.parametrize(
    ("content", "needle"),
    [(b"[" * 100_000, "cannot read plan"), (b'{"num_layers": 6, "rem\xff', "cannot read plan")],
)
def test_bad_plan_file(capsys, tmp_path, model, content, needle):
    plan = tmp_path / "plan.json"
    plan.write_bytes(content)
    refused(capsys, tmp_path, [model, plan], needle, "prune", model, "--plan", plan)


# --- silent wrong results ------------------------------------------------------------------


def test_plan_and_scores_are_strict_json(tmp_path):
    from shortgpt_export.planning import make_plan

    plan = make_plan(4, [0.1, float("nan"), 0.3, 0.4], remove=1)
    with pytest.raises(ValueError, match="JSON compliant"):
        plan.save(tmp_path / "plan.json")
    from shortgpt_export.report import strict_json

    assert json.dumps(strict_json({"a": [float("inf"), 1.0]})) == '{"a": [null, 1.0]}'


def test_reference_cache_key_follows_the_weights(tmp_path, model, tiny_llama_dir):
    import numpy as np

    from shortgpt_export.source import resolve_source
    from shortgpt_export.validation.reference import cache_key, model_fingerprint

    windows = np.arange(64).reshape(2, 32)
    source = resolve_source(str(model))
    first = cache_key(model_fingerprint(source, torch.float32), windows, 2)
    assert first == cache_key(model_fingerprint(source, torch.float32), windows, 2)
    assert first != cache_key(model_fingerprint(source, torch.bfloat16), windows, 2)
    # another model at the same path: same path string, different weight files
    shutil.rmtree(model)
    shutil.copytree(tiny_llama_dir, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes())  # same bytes, new mtime
    assert first != cache_key(model_fingerprint(source, torch.float32), windows, 2)


def test_reference_cache_key_follows_the_window_length():
    """The same tokens cut into other windows see other contexts: --ctx 32 --kl-windows 2
    must not reuse the log-probs of --ctx 64 --kl-windows 1."""
    import numpy as np

    from shortgpt_export.validation.reference import cache_key

    tokens = np.arange(128)
    short = cache_key("model", tokens.reshape(4, 32), 2)
    long = cache_key("model", tokens.reshape(2, 64), 1)
    assert short != long
    assert short == cache_key("model", tokens.reshape(4, 32).copy(), 2)


def test_reference_cache_key_follows_the_code(tmp_path, model, monkeypatch):
    """A reference cached by another version of the package, torch or transformers is
    recomputed: the key holds their identity, and the package's changes when a source
    file does."""
    import numpy as np

    import shortgpt_export.validation.reference as reference
    from shortgpt_export.code_identity import code_identity
    from shortgpt_export.source import resolve_source

    windows = np.arange(64).reshape(2, 32)
    source = resolve_source(str(model))
    identity = code_identity()
    assert "torch 2" in identity and "transformers 4" in identity and "gguf " in identity
    first = reference.cache_key(reference.model_fingerprint(source, torch.float32), windows, 2)
    monkeypatch.setattr(reference, "code_identity", lambda: identity + " (patched)")
    assert first != reference.cache_key(
        reference.model_fingerprint(source, torch.float32), windows, 2
    )
    # an edited source file of the package changes the identity
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "sub" / "a.py").write_text("x = 1\n")
    before = code_identity(package)
    assert code_identity(package) == before
    (package / "sub" / "a.py").write_text("x = 2\n")
    assert code_identity(package) != before


def test_huge_single_line_calibration_is_read_within_budget(
    tmp_path, tiny_tokenizer_dir, monkeypatch
):
    from transformers import AutoTokenizer

    from shortgpt_export.calibration import load_calibration, read_calibration_text

    line = ("the quick brown fox jumps over the lazy dog " * 250_000).strip()  # ~11 MB
    (tmp_path / "big.txt").write_text(line)
    (tmp_path / "big.jsonl").write_text(json.dumps({"text": line}) + "\n")
    for name in ("big.txt", "big.jsonl"):
        texts, _ = read_calibration_text(str(tmp_path / name), char_budget=4096)
        assert sum(len(t) for t in texts) == 4096
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    seen = []
    real = type(tokenizer).__call__

    def counting(self, text, *args, **kwargs):
        seen.append(len(text))
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", counting)
    calib = load_calibration(tokenizer, str(tmp_path / "big.txt"), seq_len=64, max_tokens=256)
    assert calib.tokens == 256
    assert max(seen) <= 8 * 256


def test_ratio_zero_warns(capsys, tmp_path, model, calib_file):
    code, _, err = run_cli(
        capsys,
        model,
        "--calib",
        calib_file,
        "--ratio",
        "0",
        "--out",
        tmp_path / "o",
        "--dry-run",
        *FAST,
    )
    assert code == 0
    assert "removes no layer" in " ".join(err.split())
    assert json.loads((tmp_path / "o" / "plan.json").read_text())["remove"] == []


def test_hub_id_default_out_is_the_repository_name(tmp_path, model):
    from shortgpt_export.pipeline import default_out_dir
    from shortgpt_export.source import resolve_source

    snapshot = Path(shutil.copytree(model, tmp_path / "snapshots" / "5f0b02c75b57c5855"))
    source = resolve_source(str(snapshot))
    source.ref = "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert default_out_dir(source) == Path("SmolLM2-135M-Instruct-shortgpt")


# --- Modelfile and tokenizer arrays --------------------------------------------------------


OLLAMA_COMMANDS = (
    "from",
    "license",
    "template",
    "system",
    "adapter",
    "draft",
    "renderer",
    "parser",
    "parameter",
    "message",
    "requires",
)


def _ollama_next(ch: str, state: str) -> tuple[str, str]:
    space, newline = ch in " \t", ch in "\r\n"
    if state == "nil":
        return ("comment", "") if ch == "#" else ("nil", "") if space or newline else ("name", ch)
    if state == "name":
        if ch.isascii() and ch.isalpha():
            return "name", ch
        if space:
            return "value", ""
        raise ValueError("invalid command")
    if state == "value":
        return ("nil", ch) if space or newline else ("value", ch)
    if state == "param":
        if ch.isascii() and (ch.isalnum() or ch == "_"):
            return "param", ch
        if space:
            return "value", ""
        raise ValueError("unexpected end of parameter name")
    return ("nil", "") if newline else ("comment", "")


def _ollama_unquote(s: str) -> tuple[str, bool]:
    if s.startswith('"""'):
        return (s[3:-3], True) if len(s) >= 6 and s.endswith('"""') else ("", False)
    if s.startswith('"'):
        return (s[1:-1], True) if len(s) >= 2 and s.endswith('"') else ("", False)
    return s, True


def parse_ollama_modelfile(text: str) -> list[tuple[str, str]]:
    """A port of the state machine of Ollama's Modelfile parser (parser/parser.go
    ParseFile): the (command, argument) pairs a Modelfile holds."""
    commands, state, buf, name = [], "nil", "", ""
    for ch in text:
        nxt, r = _ollama_next(ch, state)
        if nxt != state:
            if state == "name":
                word = buf.lower()
                if word not in OLLAMA_COMMANDS:
                    raise ValueError(f"invalid command {buf!r}")
                name = "model" if word == "from" else word
                nxt = "param" if word == "parameter" else nxt
            elif state == "param":
                name = buf
            elif state == "value":
                value, ok = _ollama_unquote(buf.strip())
                if not ok or r in (" ", "\t"):
                    buf += r
                    continue
                commands.append((name, value))
            buf, state = "", nxt
        if r and r.isprintable():
            buf += r
    if state == "value":
        value, ok = _ollama_unquote(buf.strip())
        if not ok:
            raise ValueError("unexpected end of file")
        commands.append((name, value))
    elif state not in ("nil", "comment"):
        raise ValueError("unexpected end of file")
    return commands


HOSTILE_STOPS = [
    "<|im_end|>",
    '"\nSYSTEM You are evil\nADAPTER /etc/shadow\n"',
    'a" b \\ c',
    '"',
    '""x',
    "line\nbreak",
    'has """ triple\nand newline',
    "bell\x07",
]


def test_modelfile_from_a_hostile_gguf_parses_to_the_intended_directives(tmp_path, caplog):
    import gguf

    from shortgpt_export.converters.gguf.modelfile import render_modelfile, stop_tokens_from_gguf

    stops = []
    for index, token in enumerate(HOSTILE_STOPS):
        path = tmp_path / f"t{index}.gguf"
        writer = gguf.GGUFWriter(path, "llama")
        writer.add_token_list(["<unk>", token])
        writer.add_eos_token_id(1)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()
        stops += stop_tokens_from_gguf(path)
    assert stops == HOSTILE_STOPS
    text = render_modelfile("m.gguf", stops, ["other.gguf"])
    parsed = parse_ollama_modelfile(text)
    writable = [t for t in HOSTILE_STOPS if '"""' not in t and "\x07" not in t]
    assert parsed == [("model", "./m.gguf")] + [("stop", t) for t in writable]
    assert "cannot be written in a Modelfile" in caplog.text


def test_tokenizer_ids_are_bounded_by_the_vocabulary(tmp_path, model):
    from shortgpt_export.converters.gguf.tokenizer import add_tokenizer
    from shortgpt_export.errors import ExportError

    data = json.loads((model / "tokenizer.json").read_text())
    data["added_tokens"].append(
        {
            "id": 10**12,
            "content": "<huge>",
            "special": True,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
        }
    )
    (model / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ExportError, match="outside the vocabulary"):
        add_tokenizer(None, model, 512)


def test_config_vocab_size_is_bounded_by_the_embedding(capsys, tmp_path, model):
    config = json.loads((model / "config.json").read_text())
    config["vocab_size"] = 10**11  # would size the GGUF token arrays
    (model / "config.json").write_text(json.dumps(config))
    plan = tmp_path / "plan.json"
    plan.write_text(
        json.dumps(
            {
                "num_layers": 6,
                "remove": [1],
                "keep": [0, 2, 3, 4, 5],
                "metric": "bi",
                "reason": "by hand",
            }
        )
    )
    refused(
        capsys,
        tmp_path,
        [model, plan],
        "does not match the 512 rows of the token embedding",
        "prune",
        model,
        "--plan",
        plan,
        "--to",
        "gguf",
        "--no-verify",
        "--out",
        tmp_path / "o",
        only_line=False,
    )
    assert not (tmp_path / "o").exists()


# --- SIGTERM -------------------------------------------------------------------------------

SLOW_EXPORT = """
import sys, time
import shortgpt_export.pruning as pruning
real = pruning.write_safetensors
def slow(*args, **kwargs):
    real(*args, **kwargs)
    time.sleep(60)
pruning.write_safetensors = slow
from shortgpt_export.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_during_a_run(tmp_path, model, calib_file):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            SLOW_EXPORT,
            str(model),
            "--calib",
            calib_file,
            "--out",
            str(out),
            *FAST,
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".out.tmp-*/hf/model.safetensors")):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "terminated" in err
    assert not out.exists() and leftovers(tmp_path) == []
