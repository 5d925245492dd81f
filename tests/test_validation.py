"""Validation: the same model on three back-ends, fidelity, latency, the stacking table."""

import json

import pytest
from helpers import FAST, export_with_cli, run_cli
from tiny_models import calibration_text

EVAL = [
    "--max-tokens",
    "1024",
    "--ctx",
    "128",
    "--threads",
    "2",
    "--qa",
    "3",
    "--latency-runs",
    "1",
]


@pytest.fixture(scope="module")
def tiny_llama_full(tiny_tokenizer_dir, tmp_path_factory):
    from tiny_models import build_tiny_model

    return build_tiny_model(
        "llama", tiny_tokenizer_dir, tmp_path_factory.mktemp("vllama"), full_attention=True
    )


@pytest.fixture(scope="module")
def validated(tiny_llama_full, tmp_path_factory):
    """A tiny model pruned by 2 layers to hf, F16 GGUF and fp32 ONNX, with --validate."""
    out = export_with_cli(
        tiny_llama_full,
        tmp_path_factory.mktemp("validated"),
        "--to",
        "hf",
        "--quant",
        "f16",
        "--fp32",
        "--remove",
        "2",
        "--validate",
        *EVAL,
    )
    return tiny_llama_full, out, json.loads((out / "report.json").read_text())


def rows(report, pruned):
    return {a["quant"]: a for a in report["artifacts"] if a["pruned"] == pruned}


@pytest.mark.parametrize("pruned", [False, True])
def test_three_backends_agree_on_perplexity(validated, pruned):
    _, _, report = validated
    group = rows(report, pruned)
    assert set(group) == {"torch fp32", "F16", "fp32"}
    backends = {a["backend"].split()[0] for a in group.values()}
    assert backends == {"torch", "llama.cpp", "onnxruntime"}
    torch_ppl = group["torch fp32"]["perplexity"]
    for art in group.values():
        assert art["perplexity"] == pytest.approx(torch_ppl, rel=0.01)


def test_validation_references_stay_out_of_the_users_cache(validated, private_reference_cache):
    from shortgpt_export.default_model import cache_dir

    assert list(private_reference_cache.glob("reference-*.npy"))  # the validated run's
    assert cache_dir() / "reference" != private_reference_cache


def test_default_evaluation_text_is_held_out(validated):
    _, out, report = validated
    ev = report["eval"]
    calib = str(out.parent / "calib.txt")  # export_with_cli's copy of the built-in text
    assert ev["source"] == "builtin:eval-v1" and ev["calibration"] == calib
    assert ev["in_sample"] is False
    markdown = (out / "report.md").read_text()
    assert f"Calibration text (scoring, selection, healing): {calib}." in markdown
    assert "In-sample" not in markdown


def test_reference_against_itself(validated):
    _, _, report = validated
    original = rows(report, False)["torch fp32"]
    assert original["kl_divergence"] == 0.0
    assert original["top1_agreement"] == 1.0
    assert rows(report, False)["fp32"]["kl_divergence"] == pytest.approx(0, abs=1e-6)
    assert rows(report, True)["torch fp32"]["kl_divergence"] > 0.01  # pruning is visible


def test_validation_after_layer_by_layer_scoring_streams(validated, tmp_path, monkeypatch):
    """--offload layers --validate never loads the whole model: the torch rows come from
    one layer-by-layer pass each (the pruned one healed), with the in-memory run's
    perplexity, agreement and size; the GGUF rows are measured against the same reference.
    Latency, memory and QA of the torch rows are not measured, and report.md says so."""
    import shortgpt_export.pipeline as pipeline
    from shortgpt_export.cli import main

    model, _, memory = validated
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    out = export_with_cli(
        model, tmp_path, "--to", "hf", "--quant", "f16", "--remove", "2", "--offload",
        "layers", "--validate", *EVAL,
    )  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert json.loads((out / "plan.json").read_text())["heal"]["runs"]  # a healed view
    for pruned in (False, True):
        streamed, in_memory = rows(report, pruned), rows(memory, pruned)
        assert set(streamed) == {"torch fp32", "F16"}
        for quant, art in streamed.items():
            want = in_memory[quant]
            for key in ("perplexity", "kl_divergence", "top1_agreement"):
                assert art[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), (quant, key)
            assert art["size_bytes"] == want["size_bytes"] and art["layers"] == want["layers"]
        torch_row = streamed["torch fp32"]
        assert torch_row["layer_by_layer"] and "one layer at a time" in torch_row["backend"]
        for key in ("prompt_tok_s", "gen_tok_s", "ttft_s", "qa_total"):
            assert torch_row.get(key) is None, key
        assert streamed["F16"]["gen_tok_s"] > 0 and streamed["F16"]["qa_total"] == 3
    assert rows(report, False)["torch fp32"]["kl_divergence"] == 0.0
    md = (out / "report.md").read_text()
    assert "one decoder layer in memory at a time" in md
    assert (out / "generation_speed.png").stat().st_size > 0
    # the validate command streams its reference the same way
    code = main([
        "validate", str(next(out.glob("*-pruned4L-F16.gguf"))), "--reference", str(model),
        "--out", str(tmp_path / "v"), "--offload", "layers", *EVAL, "--qa", "0",
    ])  # fmt: skip
    assert code == 0
    again = json.loads((tmp_path / "v" / "report.json").read_text())["artifacts"]
    assert [(a["label"], a.get("layer_by_layer")) for a in again][0] == ("original", True)
    for art, want in zip(
        again, [rows(memory, False)["torch fp32"], rows(memory, True)["F16"]], strict=True
    ):
        assert art["perplexity"] == pytest.approx(want["perplexity"], rel=1e-4)


def test_latency_figures_name_their_device_and_threads(validated):
    _, out, report = validated
    assert report["eval"]["tokens"] == 1024 and report["eval"]["ctx"] == 128
    assert report["eval"]["latency_runs"] == 1
    for art in report["artifacts"]:
        for key in ("prompt_tok_s", "gen_tok_s", "ttft_s"):
            assert art[key] > 0, (art["label"], key)
        assert art["device"] == "cpu" and art["threads"] == 2
        assert art["backend"]
        if art["quant"] == "torch fp32":  # in-memory rows: no separate process to measure
            assert art["peak_rss_bytes"] is None and art["rss_growth_bytes"] is None
        else:
            assert art["peak_rss_bytes"] > art["rss_growth_bytes"] > 0, art["label"]
    for name in ("report.md", "scores.png", "perplexity_vs_size.png", "generation_speed.png"):
        assert (out / name).stat().st_size > 0
    md = (out / "report.md").read_text()
    assert "| pruned | F16 |" in md and "multiplies perplexity by" in md
    assert "Latency: the median of 1 timed run after a warm-up." in md
    if any(a["accelerators"] for a in report["artifacts"]):
        assert "## Accelerators" in md
    else:  # a CPU-only machine
        assert "CPU only: no accelerator" in md and "## Accelerators" not in md
    baseline = sorted(p.name for p in (out / "baseline").iterdir())
    assert "onnx-fp32" in baseline
    (gguf,) = [n for n in baseline if n.endswith(".gguf")]
    assert gguf.endswith("-F16.gguf") and "pruned" not in gguf


def test_qa_accuracy_in_every_row_and_in_report_md(validated):
    _, out, report = validated
    for art in report["artifacts"]:
        assert art["qa_total"] == 3 and len(art["qa_answers"]) == 3, art["quant"]
        assert art["qa_correct"] == sum(art["qa_matched"])
        assert art["qa_accuracy"] == art["qa_correct"] / 3
    for pruned in (False, True):
        group = rows(report, pruned)
        # the same weights in fp32 on torch and onnxruntime: the same greedy replies
        assert group["fp32"]["qa_answers"] == group["torch fp32"]["qa_answers"]
    md = (out / "report.md").read_text()
    assert "QA exact match" in md and "## Generation: built-in questions" in md
    assert "| What is the capital of France? | Paris |" in md
    assert "original (torch fp32)" in md and "pruned (torch fp32)" in md


def test_validate_command_and_bad_inputs(capsys, validated, tmp_path, default_gguf):
    source, out, _ = validated
    gguf = next(out.glob("*-pruned4L-F16.gguf"))
    code, stdout, err = run_cli(
        capsys,
        "validate",
        gguf,
        out / "onnx-fp32",
        "--reference",
        source,
        "--out",
        tmp_path / "v",
        "--json",
        "--devices",
        "cpu",
        *EVAL,
        "--qa",
        "0",
    )
    assert code == 0, err
    report = json.loads(stdout)
    assert [a["layers"] for a in report["artifacts"]] == [6, 4, 4]
    assert not any("qa_accuracy" in a for a in report["artifacts"])  # --qa 0 skips it
    assert "## Generation" not in (tmp_path / "v" / "report.md").read_text()
    assert report["eval"]["devices"] == "cpu"
    assert all(a["accelerators"] == [] for a in report["artifacts"])
    assert (tmp_path / "v" / "report.json").is_file()

    code, _, err = run_cli(
        capsys,
        "validate",
        tmp_path / "missing.gguf",
        "--reference",
        source,
        "--out",
        tmp_path / "x",
    )
    assert code == 2 and "does not exist" in err
    code, _, err = run_cli(
        capsys, "validate", gguf, "--reference", source, "--out", tmp_path / "x", "--ctx", "512"
    )
    assert code == 2 and "--ctx 512 is larger than the model's context of 256" in err
    code, _, err = run_cli(
        capsys, "validate", gguf, "--reference", source, "--out", tmp_path / "x", "--qa", "-1"
    )
    assert code == 2 and "--qa -1 is negative" in err
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here, far fewer than one window of tokens.")
    code, _, err = run_cli(
        capsys,
        "validate",
        gguf,
        "--reference",
        source,
        "--out",
        tmp_path / "x",
        "--eval",
        short,
        "--ctx",
        "128",
    )
    assert code == 2 and "shorter than one window of 128" in " ".join(err.split())
    code, _, err = run_cli(capsys, "validate", gguf, "--out", tmp_path / "x", *EVAL)
    assert code == 2 and "tokenizer of" in err and "differently" in err  # default reference
    assert not (tmp_path / "x").exists()


def test_max_ppl_increase_fails_with_figures(capsys, tiny_llama_full, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(calibration_text())
    code, _, err = run_cli(
        capsys,
        tiny_llama_full,
        "--quant",
        "f16",
        "--remove",
        "3",
        "--calib",
        calib,
        "--out",
        tmp_path / "o",
        "--validate",
        "--max-ppl-increase",
        "0.01",
        *FAST,
        *EVAL,
        "--eval",  # the calibration file again: the report must say it is in-sample
        calib,
    )
    message = " ".join(err.split())
    # random weights: pruning may even lower perplexity, so the limit is far below 1
    assert code == 3 and "(limit 0.01x)" in message
    assert "x the original's" in message
    # the log line wraps at the terminal's width, inside the path too
    assert f"--eval {calib} is also the calibration text".replace(" ", "") in message.replace(
        " ", ""
    )
    report = json.loads((tmp_path / "o" / "report.json").read_text())  # kept for the user
    assert report["eval"]["in_sample"] is True
    assert report["eval"]["source"] == report["eval"]["calibration"] == str(calib)
    assert "**In-sample:**" in (tmp_path / "o" / "report.md").read_text()


def test_stacking_table_on_the_default_model(capsys, default_gguf, tmp_path):
    code, stdout, err = run_cli(
        capsys,
        "--quant",  # the headline type; every GGUF type takes the same validation path
        "q4_k_m",  # (F16 rows: the tiny model's table above)
        "--remove",
        "4",
        "--heal",  # the table is under test, not the plan: plain removal, less calibration
        "none",
        "--calib-tokens",
        "512",
        "--out",
        tmp_path / "s",
        "--validate",
        "--max-tokens",  # one window, one timed latency run: the columns are under test
        "256",
        "--ctx",
        "256",
        "--kl-windows",
        "1",
        "--latency-runs",
        "1",
        "--threads",
        "2",
        "--qa",  # one question: the column is under test here; test_qa.py checks answers
        "1",
        "--json",
    )
    assert code == 0, err
    report = json.loads(stdout)["report"]
    table = {(a["label"], a["quant"]): a for a in report["artifacts"]}
    expected = {(label, q) for label in ("original", "pruned") for q in ("torch fp32", "Q4_K_M")}
    assert set(table) == expected
    for art in table.values():
        for key in (
            "perplexity",
            "kl_divergence",
            "top1_agreement",
            "size_bytes",
            "prompt_tok_s",
            "gen_tok_s",
            "qa_accuracy",
        ):
            assert art[key] is not None, (art["label"], art["quant"], key)
    assert table[("pruned", "Q4_K_M")]["perplexity"] > table[("original", "Q4_K_M")]["perplexity"]
    assert table[("pruned", "Q4_K_M")]["size_bytes"] < table[("original", "Q4_K_M")]["size_bytes"]
    md = (tmp_path / "s" / "report.md").read_text()
    assert "multiplies perplexity by" in md
    # The unpruned model exported the same way ends its chat reply at the end of turn.
    stop = table[("original", "Q4_K_M")]["chat_stop"]
    assert stop["stops"] and stop["end_of_turn"] == "<|im_end|>", stop
    assert stop["reply"].endswith("<|im_end|>") and stop["tokens"] <= 32
    assert "chat_stop" not in table[("pruned", "Q4_K_M")]
    assert "## Chat end-of-turn check" in md and "stops at '<|im_end|>'" in md
    for art in (a for a in table.values() if a["format"] == "gguf"):
        # The file (mmapped) plus KV cache and a [ctx, vocab] logits buffer. The KL
        # bookkeeping, 100 MB per float64 copy of two windows, must not be counted.
        assert 0 < art["rss_growth_bytes"] < art["size_bytes"] + 300e6, art["quant"]


@pytest.fixture
def evaluation(validated, tmp_path):
    """The validated model's evaluation set-up, in this process (for worker-level tests)."""
    from shortgpt_export.source import load_model, resolve_source
    from shortgpt_export.validation.reference import EvalOptions, prepare

    source, _, _ = validated
    loaded = load_model(resolve_source(str(source)))
    opts = EvalOptions(ctx=128, max_tokens=256, kl_windows=1, threads=2, reps=1, gen_tokens=4)
    return prepare(loaded, opts, tmp_path / "cache", tmp_path)


def test_accelerator_probes_read_the_backend_builds(monkeypatch):
    import llama_cpp
    import onnxruntime

    from shortgpt_export.validation import devices

    assert devices.accelerators("gguf") == (
        [] if not llama_cpp.llama_supports_gpu_offload() else devices.llama_cpp_accelerators()
    )
    monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda: True)
    monkeypatch.setattr(
        llama_cpp,
        "llama_print_system_info",
        lambda: b"Metal : EMBED_LIBRARY = 1 | BLAS : ACCELERATE = 1 | CPU : NEON = 1 | ",
    )
    assert devices.accelerators("gguf") == ["metal"]
    monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda: False)
    assert devices.accelerators("gguf") == []  # a CPU-only build offloads nothing
    monkeypatch.setattr(
        onnxruntime,
        "get_available_providers",
        lambda: ["CoreMLExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    assert devices.accelerators("onnx") == ["cuda", "coreml"]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert devices.accelerators("onnx") == []


def test_a_missing_accelerator_is_a_clear_error(validated, monkeypatch):
    import onnxruntime

    from shortgpt_export.errors import DeviceUnavailableError
    from shortgpt_export.validation.evaluators import open_evaluator

    _, out, _ = validated
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(DeviceUnavailableError, match=r"'coreml' is not available .*cpu\)"):
        open_evaluator(out / "onnx-fp32", 2, device="coreml")


def test_accelerator_figures_reach_the_report(validated, evaluation, monkeypatch):
    """With a stand-in accelerator (onnxruntime's CPU provider under another name) the worker
    adds agreement and latency for it, and a provider that cannot start is reported, not
    fatal."""
    from shortgpt_export.report import devices_note, render_markdown
    from shortgpt_export.validation import devices
    from shortgpt_export.validation.artifact_eval import worker_job
    from shortgpt_export.validation.worker import evaluate

    _, out, _ = validated
    monkeypatch.setitem(devices.ORT_PROVIDERS, "stand-in", "CPUExecutionProvider")
    job = worker_job(out / "onnx-fp32", evaluation)
    assert job["devices"] == ["stand-in"]
    job["devices"].append("cuda")  # not available here: an error entry
    record = evaluate(job)
    standin, cuda = record["accelerators"]
    assert standin["device"] == "stand-in" and standin["threads"] == 2
    assert standin["kl_divergence"] == pytest.approx(record["kl_divergence"], abs=1e-9)
    assert standin["top1_agreement"] == record["top1_agreement"]
    assert standin["gen_tok_s"] > 0 and standin["prompt_tok_s"] > 0 and standin["ttft_s"] > 0
    assert cuda["device"] == "cuda" and "not available" in cuda["error"]
    assert record["device"] == "cpu" and record["perplexity"] > 1
    entry = {"label": "pruned", "quant": "fp32", "pruned": True, "format": "onnx", "path": "x"}
    report = {"eval": evaluation.describe(), "artifacts": [entry | record]}
    md = render_markdown(report)
    assert "## Accelerators" in md and "| pruned | fp32 | stand-in | onnxruntime" in md
    assert "| pruned | fp32 | cuda | failed: device 'cuda' is not available" in md
    assert devices_note(report).startswith("Accelerator figures are in addition")
    evaluation.opts.devices = "cpu"
    assert worker_job(out / "onnx-fp32", evaluation)["devices"] == []
    cpu_only = {"eval": evaluation.describe(), "artifacts": [entry | record | {"accelerators": []}]}
    assert devices_note(cpu_only) == "Latency measured on the CPU only (--devices cpu)."


def test_torch_evaluator_keeps_the_callers_thread_count(tiny_llama_full):
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from shortgpt_export.validation.evaluators import TorchEvaluator

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_full)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        evaluator = TorchEvaluator(tiny_llama_full, 2, model=model, tokenizer=object())
        seen = []
        hook = model.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
        logprobs = evaluator.logprobs(np.arange(8))
        hook.remove()
        assert seen == [2]  # the evaluator's --threads while it runs
        assert torch.get_num_threads() == 1  # and the caller's afterwards
        assert logprobs.shape[0] == 8
    finally:
        torch.set_num_threads(before)
