"""Scoring throughput and memory on the default model (issue: core pipeline).

Side by side, on the same token windows, interleaved, median of repetitions:
  bare     the model's base forward pass, no hooks (what scoring cannot beat)
  hooked   shortgpt-export's scoring (hooks and running sums)
  hidden   the reference implementations' approach: output_hidden_states=True, then
           cosines over the stored states of every layer
Peak memory: a fresh process per calibration size (1x, 2x, 4x), peak RSS minus the RSS
after loading the model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from shortgpt_export.calibration import tokenize_windows
from shortgpt_export.scoring import score_layers, token_metric
from shortgpt_export.source import load_model, resolve_source

WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw-test.txt"
SEQ_LEN, BATCH = 256, 4


def setup(tokens: int):
    loaded = load_model(resolve_source(None), device="cpu")
    calib = tokenize_windows(
        loaded.tokenizer,
        [WIKITEXT.read_text("utf-8")],
        source="wikitext",
        seq_len=SEQ_LEN,
        max_tokens=tokens,
        seed=0,
    )
    return loaded, calib


def bare(loaded, calib):
    base = loaded.model.model
    with torch.inference_mode():
        for s in range(0, calib.input_ids.shape[0], BATCH):
            base(
                input_ids=calib.input_ids[s : s + BATCH],
                attention_mask=calib.attention_mask[s : s + BATCH],
                use_cache=False,
            )


def hooked(loaded, calib):
    return score_layers(loaded.model, loaded.source.spec, calib, batch_size=BATCH)


def hidden(loaded, calib):
    sums = None
    with torch.inference_mode():
        for s in range(0, calib.input_ids.shape[0], BATCH):
            mask = calib.attention_mask[s : s + BATCH].bool()
            states = loaded.model(
                input_ids=calib.input_ids[s : s + BATCH],
                attention_mask=calib.attention_mask[s : s + BATCH],
                output_hidden_states=True,
                use_cache=False,
            ).hidden_states
            values = [
                token_metric(states[i], states[i + 1], "bi")[mask].sum()
                for i in range(len(states) - 1)
            ]
            sums = values if sums is None else [a + b for a, b in zip(sums, values, strict=True)]
    return sums


def throughput(tokens: int, reps: int) -> dict:
    loaded, calib = setup(tokens)
    runs = {"bare": bare, "hooked": hooked, "hidden": hidden}
    for fn in runs.values():  # warm-up
        fn(loaded, calib)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(reps):
        for name, fn in runs.items():
            began = time.perf_counter()
            fn(loaded, calib)
            times[name].append(time.perf_counter() - began)
    return {
        name: {"median_s": statistics.median(t), "tok_s": calib.tokens / statistics.median(t)}
        for name, t in times.items()
    } | {"tokens": calib.tokens}


def memory_probe(tokens: int, method: str) -> None:
    """RSS sampled while scoring, against the RSS just before (loading peaks excluded)."""
    import psutil

    from shortgpt_export.validation.evaluators import PeakRss

    loaded, calib = setup(tokens)
    before = psutil.Process().memory_info().rss
    with PeakRss(interval=0.005) as rss:
        {"hooked": hooked, "hidden": hidden}[method](loaded, calib)
    print(
        json.dumps(
            {
                "tokens": calib.tokens,
                "method": method,
                "peak_kb": rss.peak // 1024,
                "growth_kb": (rss.peak - before) // 1024,
            }
        )
    )


def memory(tokens: int) -> list[dict]:
    rows = []
    for factor in (1, 2, 4):
        for method in ("hooked", "hidden"):
            out = subprocess.run(
                [sys.executable, __file__, "--probe", str(tokens * factor), method],
                capture_output=True,
                text=True,
                check=True,
            )
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]) | {"factor": factor})
    return rows


def report(tokens: int = 4096, reps: int = 5) -> str:
    torch.set_num_threads(torch.get_num_threads())
    t = throughput(tokens, reps)
    m = memory(tokens)
    lines = [
        "## Scoring throughput and memory (core pipeline)",
        "",
        f"Default model (SmolLM2-135M-Instruct, fp32, CPU, {torch.get_num_threads()} threads), "
        f"WikiText-2 test, {t['tokens']} tokens in windows of {SEQ_LEN}, batch {BATCH}; "
        f"median of {reps} interleaved runs after a warm-up.",
        "",
        "| method | median s | tokens/s | vs. bare forward |",
        "|---|---:|---:|---:|",
    ]
    for name, label in (
        ("bare", "bare forward (base model, no hooks)"),
        ("hooked", "shortgpt-export scoring (hooks, running sums)"),
        ("hidden", "output_hidden_states (reference implementations)"),
    ):
        row = t[name]
        lines.append(
            f"| {label} | {row['median_s']:.2f} | {row['tok_s']:,.0f} | "
            f"{row['tok_s'] / t['bare']['tok_s']:.2f}x |"
        )
    lines += [
        "",
        "Memory of a fresh process per calibration size: RSS sampled every 5 ms while "
        "scoring; growth = that peak minus the RSS just before scoring:",
        "",
        "| calibration tokens | method | peak RSS MB | growth during scoring MB |",
        "|---:|---|---:|---:|",
    ]
    for row in m:
        lines.append(
            f"| {row['tokens']} ({row['factor']}x) | {row['method']} | "
            f"{row['peak_kb'] / 1024:,.0f} | {row['growth_kb'] / 1024:,.1f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--probe", nargs=2, metavar=("TOKENS", "METHOD"))
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    if args.probe:
        memory_probe(int(args.probe[0]), args.probe[1])
    else:
        print(report(args.tokens, args.reps))
