"""The command line end to end on tiny models, and every bad input it must reject."""

import errno
import json
import shutil

import pytest
import torch
from helpers import FAST, run_cli

from shortgpt_export.architectures import supported_families


def test_run_writes_scores_plan_and_pruned_folder(capsys, tiny_llama_dir, tmp_path, calib_file):
    out = tmp_path / "out"
    code, stdout, _ = run_cli(
        capsys,
        tiny_llama_dir,
        "--calib",
        calib_file,
        "--remove",
        "2",
        "--out",
        out,
        "--json",
        *FAST,
    )
    assert code == 0
    summary = json.loads(stdout)
    scores = json.loads((out / "scores.json").read_text())
    plan = json.loads((out / "plan.json").read_text())
    assert scores["num_layers"] == 6 and len(scores["scores"]) == 6
    assert scores["calibration"] == {
        "source": calib_file,
        "tokens": 512,
        "seq_len": 64,
        "windows": 8,
    }
    assert scores["model"]["architecture"] == "llama"
    lowest = sorted(range(6), key=lambda i: scores["scores"][i])[:2]
    assert plan["remove"] == sorted(lowest) == summary["remove"]
    assert json.loads((out / "hf" / "config.json").read_text())["num_hidden_layers"] == 4
    assert summary["artifacts"][0]["layers"] == 4
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_table_lists_every_layer_sorted_with_bars(capsys, tiny_llama_dir, tmp_path, calib_file):
    code, stdout, _ = run_cli(
        capsys, "score", tiny_llama_dir, "--calib", calib_file, "--out", tmp_path / "s", *FAST
    )
    assert code == 0
    scores = json.loads((tmp_path / "s" / "scores.json").read_text())["scores"]
    rows = [line for line in stdout.splitlines() if "█" in line or "▏" in line]
    assert len(rows) == 6
    shown = [float(row.split("│")[3]) for row in rows]
    assert shown == sorted(shown) == pytest.approx(sorted(scores), abs=1e-4)


def test_dry_run_writes_plan_only(capsys, tiny_llama_dir, tmp_path, calib_file):
    out = tmp_path / "dry"
    code, stdout, _ = run_cli(
        capsys, tiny_llama_dir, "--calib", calib_file, "--dry-run", "--out", out, *FAST
    )
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["plan.json"]
    assert "remove 1 lowest-BI layers" in stdout  # 25% of 6, rounded down


def test_prune_from_plan(capsys, tiny_llama_dir, tmp_path):
    plan = {
        "num_layers": 6,
        "remove": [0, 5],
        "keep": [1, 2, 3, 4],
        "metric": "bi",
        "reason": "by hand",
    }
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    code, _, _ = run_cli(
        capsys, "prune", tiny_llama_dir, "--plan", tmp_path / "plan.json", "--out", tmp_path / "p"
    )
    assert code == 0
    assert json.loads((tmp_path / "p" / "hf" / "config.json").read_text())["num_hidden_layers"] == 4


def make_folder(kind, tmp_path, tiny_llama_dir):
    """Model folders that must be refused, built on the fly."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    path = tmp_path / kind
    if kind == "bert":
        config = AutoConfig.for_model(
            "bert",
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            vocab_size=99,
        )
        AutoModel.from_config(config).save_pretrained(path)
    elif kind == "gpt2":
        config = AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=2, vocab_size=99)
        AutoModelForCausalLM.from_config(config).save_pretrained(path)
    elif kind == "pickle":
        shutil.copytree(tiny_llama_dir, path)
        model = AutoModelForCausalLM.from_pretrained(path)
        (path / "model.safetensors").unlink()
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    elif kind in ("corrupt", "truncated"):
        shutil.copytree(tiny_llama_dir, path)
        weights = path / "model.safetensors"
        data = weights.read_bytes()
        weights.write_bytes(b"\xff" * 64 if kind == "corrupt" else data[: len(data) // 2])
    return path


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("bert", "is a 'bert' model, not a decoder-only causal language model"),
        (
            "gpt2",
            "unsupported model family 'gpt2' — supported families: "
            + ", ".join(supported_families()),
        ),
        ("pickle", "holds only pickle checkpoints (pytorch_model.bin)"),
        ("corrupt", "is not a valid safetensors file: header length"),
        ("truncated", "is not a valid safetensors file: tensor"),
    ],
)
def test_bad_model_folders(capsys, tmp_path, tiny_llama_dir, kind, message):
    path = make_folder(kind, tmp_path, tiny_llama_dir)
    code, _, err = run_cli(capsys, "score", path, "--out", tmp_path / "o")
    assert code == 2
    assert message in " ".join(err.split())
    assert not (tmp_path / "o").exists()


def test_pickle_is_loaded_with_allow_pickle(capsys, tmp_path, tiny_llama_dir, calib_file):
    path = make_folder("pickle", tmp_path, tiny_llama_dir)
    code, _, err = run_cli(
        capsys, path, "--allow-pickle", "--calib", calib_file, "--out", tmp_path / "o", *FAST
    )
    assert code == 0, err
    assert (tmp_path / "o" / "hf" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--remove", "6"], "--remove 6 is not possible for a model with 6 layers"),
        (["--remove", "-1"], "--remove -1 is not possible"),
        (["--ratio", "1.5"], "--ratio 1.5 is outside [0, 1)"),
        (["--layers", "1,9"], "layer indices [9] are out of range"),
        (["--to", "tflite"], "unknown export format 'tflite' — supported: gguf, hf, onnx"),
        (["--metric", "bi", "--batch-size", "0"], "--batch-size 0 must be at least 1"),
        (["--ctx", "128"], "without --validate, --ctx would be ignored"),
        (["--eval", "x.txt", "--qa", "3"], "without --validate, --eval, --qa would be ignored"),
        (["--kl-windows", "1", "--max-tokens", "64"], "--max-tokens, --kl-windows would be"),
        (["--latency-runs", "1"], "without --validate, --latency-runs would be ignored"),
        (["--validate", "--latency-runs", "0"], "--latency-runs: 0 must be at least 1"),
        (["--validate", "--dry-run"], "--validate has nothing to measure with --dry-run"),
        (["--max-ppl-increase", "2"], "--max-ppl-increase needs --validate"),
        (["--greedy-candidates", "3"], "--greedy-candidates only apply to --select greedy"),
        (["--greedy-candidates", "0", "--select", "greedy"], "--greedy-candidates"),
    ],
)
def test_bad_options(capsys, tiny_llama_dir, tmp_path, calib_file, args, message):
    code, _, err = run_cli(
        capsys, tiny_llama_dir, "--calib", calib_file, "--out", tmp_path / "o", *FAST, *args
    )
    assert code == 2
    assert message in " ".join(err.split())
    assert not (tmp_path / "o").exists()


def test_missing_model_and_bad_gguf(capsys, tmp_path):
    code, _, err = run_cli(capsys, "score", tmp_path / "nowhere")
    assert code == 2 and "does not exist" in err
    fake = tmp_path / "broken.gguf"
    fake.write_bytes(b"GGUF" + b"\x00\x01" * 100)
    code, _, err = run_cli(capsys, "score", fake)
    assert code == 2 and "cannot read GGUF file" in " ".join(err.split())
    fake.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    code, _, err = run_cli(capsys, "score", fake)
    assert code == 2 and "is not a GGUF file" in " ".join(err.split())


def test_empty_calibration(capsys, tiny_llama_dir, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    code, _, err = run_cli(
        capsys, tiny_llama_dir, "--calib", tmp_path / "empty.txt", "--out", tmp_path / "o"
    )
    assert code == 2 and "is empty" in err


def test_existing_out_needs_force(capsys, tiny_llama_dir, tmp_path, calib_file):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, tiny_llama_dir, "--calib", calib_file, "--out", out, *FAST)
    assert code == 2 and "already exists" in err and "--force" in err
    assert (out / "keep.txt").read_text() == "mine"
    code, _, _ = run_cli(
        capsys, tiny_llama_dir, "--calib", calib_file, "--out", out, "--force", *FAST
    )
    assert code == 0 and not (out / "keep.txt").exists() and (out / "hf").is_dir()


@pytest.mark.parametrize("failure", ["interrupt", "disk-full"])
def test_failed_write_leaves_nothing_partial(
    capsys, monkeypatch, tiny_llama_dir, tmp_path, calib_file, failure
):
    import shortgpt_export.pruning as pruning

    real = pruning.write_safetensors

    def write_then_fail(path, tensors, metadata=None):
        real(path, tensors, metadata)  # a shard lands on disk, then the write fails
        if failure == "interrupt":
            raise KeyboardInterrupt
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pruning, "write_safetensors", write_then_fail)
    out = tmp_path / "o"
    out.mkdir()
    (out / "old.txt").write_text("previous run")
    code, _, err = run_cli(
        capsys, tiny_llama_dir, "--calib", calib_file, "--out", out, "--force", *FAST
    )
    assert code == (130 if failure == "interrupt" else 2)
    if failure == "disk-full":
        assert "disk filled up" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "o"]
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]


def test_score_then_plan_then_prune(capsys, tiny_llama_dir, tmp_path, calib_file):
    """score -> plan -> prune, each from the previous step's file, no model in `plan`."""
    code, _, err = run_cli(
        capsys, "score", tiny_llama_dir, "--calib", calib_file, "--metric", "angular",
        "--out", tmp_path / "s", *FAST,
    )  # fmt: skip
    assert code == 0, err
    scores = json.loads((tmp_path / "s" / "scores.json").read_text())
    code, stdout, err = run_cli(capsys, "plan", tmp_path / "s" / "scores.json", "--remove", "2")
    assert code == 0, err
    plan = json.loads((tmp_path / "s" / "plan.json").read_text())
    lowest = sorted(sorted(range(6), key=lambda i: scores["scores"][i])[:2])
    assert plan["remove"] == lowest and plan["metric"] == "angular"
    assert plan["keep"] == [i for i in range(6) if i not in lowest]
    code, _, err = run_cli(
        capsys, "plan", tmp_path / "s" / "scores.json", "--select", "block", "--remove", "2",
        "--out", tmp_path / "b",
    )  # fmt: skip
    assert code == 0, err
    block = json.loads((tmp_path / "b" / "plan.json").read_text())
    row = scores["block_distances"][1]
    start = row.index(min(row))
    assert block["remove"] == [start, start + 1] and block["strategy"] == "block"
    code, _, err = run_cli(capsys, "plan", tmp_path / "s" / "scores.json", "--remove", "1")
    assert code == 2 and "already exists" in " ".join(err.split())  # no silent overwrite
    code, _, err = run_cli(
        capsys, "prune", tiny_llama_dir, "--plan", tmp_path / "s" / "plan.json",
        "--out", tmp_path / "p",
    )  # fmt: skip
    assert code == 0, err
    config = json.loads((tmp_path / "p" / "hf" / "config.json").read_text())
    assert config["num_hidden_layers"] == 4
    card = (tmp_path / "p" / "hf" / "README.md").read_text()
    assert "Metric: `angular` (angular distance" in card and "1 - mean cosine" not in card
    code, _, err = run_cli(
        capsys, "plan", tmp_path / "s" / "scores.json", "--remove", "9", "--force"
    )
    assert code == 2 and "--remove 9 is not possible" in " ".join(err.split())


def test_top_level_help_lists_every_subcommand(capsys):
    from shortgpt_export.cli import SUBCOMMANDS

    with pytest.raises(SystemExit):
        run_cli(capsys, "--help")
    text = " ".join(capsys.readouterr().out.split())
    for name in SUBCOMMANDS:
        if name != "run":
            assert name in text, name
