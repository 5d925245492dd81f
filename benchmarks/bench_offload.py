"""Scoring a model layer by layer (--offload layers) against scoring it whole in memory.

A random Llama model of about 4 GB of float32 weights (24 layers, hidden 2048) is written
tensor by tensor as safetensors shards to a temporary folder (never whole in memory).
Each measurement runs in a fresh subprocess on the same random token windows:
  memory    load_model + score_layers (the whole model in memory)
  streamed  offload.stream_scores (one decoder layer in memory at a time)
Peak RSS growth = the process's peak RSS (VmHWM) minus the RSS just before loading (after
imports, a warm-up forward pass of a tiny model, and the calibration windows). The modes
alternate; times and growths are medians.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIG = {
    "vocab_size": 32000,
    "hidden_size": 2048,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-5,
}
WINDOWS, SEQ_LEN, BATCH = 4, 256, 4
if os.environ.get("BENCH_OFFLOAD_SMOKE"):  # a tiny run of the same code, to check it
    CONFIG.update(hidden_size=256, intermediate_size=512, num_hidden_layers=4)


def build(folder: Path, seed: int = 0) -> tuple[int, int]:
    """Write the random model (one shard per layer, plus an index); returns its bytes and
    the bytes of one decoder layer."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from shortgpt_export.offload import skeleton

    config = AutoConfig.for_model("llama", **CONFIG)
    config.save_pretrained(folder)
    _placeholder_tokenizer(folder)
    model = skeleton(config, torch.float32)
    groups: dict[str, dict] = {}
    for name, meta in model.state_dict().items():
        parts = name.split(".")
        key = f"layer{int(parts[2]):02d}" if name.startswith("model.layers.") else "rest"
        groups.setdefault(key, {})[name] = meta.shape
    generator = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for key, shapes in sorted(groups.items()):
        tensors = {}
        for name, shape in shapes.items():
            if len(shape) == 1:
                tensors[name] = torch.ones(shape)
            else:
                tensors[name] = torch.randn(shape, generator=generator) * 0.02
            total += tensors[name].numel() * 4
        file = f"model-{key}.safetensors"
        save_file(tensors, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    layer = sum(math.prod(shape) * 4 for shape in groups["layer00"].values())
    return total, layer


def _placeholder_tokenizer(folder: Path) -> None:
    """load_model loads a tokenizer; the windows are random ids, so any will do."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(folder)


def calibration():
    import torch

    from shortgpt_export.calibration import CalibrationSet

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, CONFIG["vocab_size"], (WINDOWS, SEQ_LEN), generator=generator)
    return CalibrationSet(ids, torch.ones_like(ids), "random", SEQ_LEN)


def peak_rss() -> int:
    """This process's peak RSS in bytes: VmHWM on Linux. getrusage's ru_maxrss survives
    exec on Linux, so a child started by a large parent would report the parent's RSS."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _warm_up() -> None:
    """Lazy imports and first-call allocations of a forward pass, out of the growth."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    small = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1}
    config = AutoConfig.for_model("llama", **{**CONFIG, **small, "vocab_size": 64})
    with torch.inference_mode():
        AutoModelForCausalLM.from_config(config)(input_ids=torch.zeros(1, 8, dtype=torch.long))


def measure(mode: str, folder: Path) -> dict:
    """One measurement (run in a fresh process): seconds, RSS growth, the scores."""
    import psutil
    import torch

    from shortgpt_export.offload import scoring_windows_per_pass, stream_scores
    from shortgpt_export.scoring import score_layers
    from shortgpt_export.source import load_model, resolve_source

    source = resolve_source(str(folder))
    calib = calibration()
    _warm_up()
    before = psutil.Process().memory_info().rss
    began = time.perf_counter()
    if mode == "memory":
        loaded = load_model(source, device="cpu", dtype="float32")
        loaded_s = time.perf_counter() - began
        scores = score_layers(loaded.model, source.spec, calib, batch_size=BATCH)
    else:
        loaded_s = 0.0
        # windows per pass as score_streamed (what --offload layers runs) groups them
        windows = scoring_windows_per_pass(BATCH)
        scores = stream_scores(source, calib, dtype=torch.float32, batch_size=windows, spill=False)
    seconds = time.perf_counter() - began
    peak = peak_rss()
    return {
        "mode": mode,
        "seconds": seconds,
        "load_s": loaded_s,
        "growth": peak - before,
        "scores": scores,
    }


def _run(mode: str, folder: Path) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--measure", mode, str(folder)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(reps: int = 3) -> str:
    root = Path(tempfile.mkdtemp(prefix="shortgpt-bench-offload-"))
    try:
        total, layer_bytes = build(root)
        activation_bytes = WINDOWS * SEQ_LEN * CONFIG["hidden_size"] * 4
        runs = {"memory": [], "streamed": []}
        load_before = os.getloadavg()[0]
        for _ in range(reps):
            for mode in runs:
                runs[mode].append(_run(mode, root))
        load_after = os.getloadavg()[0]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = {
        mode: {k: statistics.median(r[k] for r in rows) for k in ("seconds", "load_s", "growth")}
        for mode, rows in runs.items()
    }
    diff = max(
        abs(a - b) / abs(a)
        for m in runs["memory"]
        for s in runs["streamed"]
        for a, b in zip(m["scores"], s["scores"], strict=True)
    )
    from shortgpt_export.offload import SCORING_WINDOWS_PER_PASS, scoring_windows_per_pass

    per_pass = scoring_windows_per_pass(BATCH)
    mb = 1024 * 1024
    mem, streamed = med["memory"], med["streamed"]
    budget = layer_bytes + activation_bytes
    lines = [
        "## Scoring larger than memory (--offload layers)",
        "",
        f"Random Llama model built by the benchmark: {CONFIG['num_hidden_layers']} layers, "
        f"hidden {CONFIG['hidden_size']}, {total / 1e9:.2f} GB of float32 weights in "
        f"safetensors shards; {WINDOWS} windows x {SEQ_LEN} random tokens, float32 on CPU; "
        f"in memory {BATCH} windows per forward pass (the default `--batch-size`), layer by "
        f"layer {per_pass} per pass (what `--offload layers` scores with: `--batch-size`, at "
        f"most {SCORING_WINDOWS_PER_PASS}). Each run is a fresh process; the two modes "
        f"alternate; median of {reps} runs each. 1-minute load average of the 2-core machine: "
        f"{load_before:.1f} before the runs, {load_after:.1f} after.",
        "",
        "| mode | time s (load) | peak RSS growth MB |",
        "|---|---:|---:|",
        f"| whole model in memory | {mem['seconds']:.1f} ({mem['load_s']:.1f}) | "
        f"{mem['growth'] / mb:,.0f} |",
        f"| layer by layer (`--offload layers`) | {streamed['seconds']:.1f} | "
        f"{streamed['growth'] / mb:,.0f} |",
        "",
        f"- one decoder layer {layer_bytes / mb:.0f} MB + activations "
        f"{activation_bytes / mb:.0f} MB = {budget / mb:.0f} MB; streamed growth is "
        f"{streamed['growth'] / budget:.2f}x that (target <= 1.5x) and "
        f"{streamed['growth'] / mem['growth']:.3f}x the in-memory growth",
        f"- the rest of the streamed growth ({(streamed['growth'] - budget) / mb:.0f} MB) is "
        f"the forward-pass intermediates of {per_pass} windows ({per_pass * SEQ_LEN} tokens "
        f"through an MLP "
        f"of {CONFIG['intermediate_size']} and the attention) and bookkeeping (masks, rotary "
        "tables, the recorded batches, heap fragmentation)",
        f"- streamed time is {streamed['seconds'] / mem['seconds']:.2f}x the in-memory "
        "time, loading included (target <= 1.3x)",
        f"- largest relative score difference: {diff:.1e} (same dtype; batches of {BATCH} "
        f"windows against {per_pass} per pass)",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--measure", nargs=2, metavar=("MODE", "FOLDER"))
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[0], Path(args.measure[1]))))
    else:
        print(report())
