"""llama.cpp speed of pruned vs. unpruned GGUF files, and the shared pieces of the GGUF
benchmarks.

Side by side in one run: llama.cpp generation and prompt tok/s of the pruned Q4_K_M file
against the unpruned Q4_K_M file (both quantized from F16 the same way), against the ideal
speed-up from the share of weights removed. The F16 export's throughput and peak RSS are
bench_io's (it measures them against plain copies with the page cache settled; it runs
this module's ``--probe`` for the memory).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

WORK = Path(__file__).resolve().parent / "_work"
HF_DIR = WORK / "smollm2-bf16"
REMOVE = 7  # 25% of 30 layers, rounded down


def ensure_hf_copy() -> Path:
    """A bf16 safetensors folder of the default model (made once, from its GGUF)."""
    if (HF_DIR / "config.json").is_file():
        return HF_DIR
    import torch

    from shortgpt_export.source import load_model, resolve_source

    loaded = load_model(resolve_source(None), device="cpu")
    loaded.model.to(torch.bfloat16).save_pretrained(HF_DIR, safe_serialization=True)
    loaded.tokenizer.save_pretrained(HF_DIR)
    return HF_DIR


def export_f16(target: Path, remove: list[int]) -> None:
    from shortgpt_export.converters import ExportContext
    from shortgpt_export.converters.gguf.hf_to_gguf import convert_pruned
    from shortgpt_export.planning import make_plan
    from shortgpt_export.source import resolve_source

    source = resolve_source(str(HF_DIR))
    plan = make_plan(source.num_layers, layers=remove)
    convert_pruned(ExportContext(source=source, plan=plan, out_dir=target.parent), target)


def memory_probe(target: str) -> None:
    """RSS sampled while exporting, against the RSS just before the export starts."""
    import psutil

    import shortgpt_export.converters.gguf.hf_to_gguf  # noqa: F401  (imports are not the export's memory)
    from shortgpt_export.pruning import source_tensors
    from shortgpt_export.source import resolve_source

    resolve_source(str(HF_DIR))  # pulls in torch and transformers before the baseline
    from shortgpt_export.validation.evaluators import PeakRss

    largest = max(ref.nbytes for ref in source_tensors(HF_DIR).values())
    before = psutil.Process().memory_info().rss
    with PeakRss(interval=0.005) as rss:
        export_f16(Path(target), [])
    print(json.dumps({"before": before, "after": rss.peak, "largest": largest}))


def llama_speed(path: Path, prompt: list[int], gen: int, reps: int) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=512, n_threads=2, n_batch=512, verbose=False)
    prompt_rates, gen_rates = [], []
    try:
        for i in range(reps + 1):  # the first run warms up
            llm.reset()
            began = time.perf_counter()
            llm.eval(prompt)
            prompted = time.perf_counter()
            token = prompt[-1]
            for _ in range(gen):
                token = llm.sample(temp=0.0)
                llm.eval([token])
            done = time.perf_counter()
            if i:
                prompt_rates.append(len(prompt) / (prompted - began))
                gen_rates.append(gen / (done - prompted))
    finally:
        llm.close()
    return {
        "prompt_tok_s": statistics.median(prompt_rates),
        "gen_tok_s": statistics.median(gen_rates),
    }


def speed(reps: int) -> dict:
    from transformers import AutoTokenizer

    from shortgpt_export.converters.gguf.quantize import QUANT_TYPES, quantize_gguf
    from shortgpt_export.planning import make_plan
    from shortgpt_export.pruning import source_tensors
    from shortgpt_export.source import resolve_source

    source = resolve_source(str(HF_DIR))
    files = {}
    for label, remove in (("unpruned", []), ("pruned", None)):
        if remove is None:  # remove the lowest-BI layers, as the tool would
            scores = json.loads((WORK / "scores.json").read_text())["scores"]
            remove = make_plan(30, scores, remove=REMOVE).remove
        f16 = WORK / f"{label}-F16.gguf"
        export_f16(f16, remove)
        q4 = WORK / f"{label}-Q4_K_M.gguf"
        quantize_gguf(f16, q4, QUANT_TYPES["Q4_K_M"])
        files[label] = q4
    tokenizer = AutoTokenizer.from_pretrained(HF_DIR)
    text = (Path(__file__).resolve().parents[2] / "shared/data/wikitext-2-raw-test.txt").read_text()
    prompt = tokenizer(text[:4000], add_special_tokens=False).input_ids[:128]
    results: dict = {label: {"prompt": [], "gen": []} for label in files}
    for _ in range(reps):  # interleaved, so both files see the same machine load
        for label, path in files.items():
            run = llama_speed(path, prompt, gen=64, reps=1)
            results[label]["prompt"].append(run["prompt_tok_s"])
            results[label]["gen"].append(run["gen_tok_s"])
    for label, path in files.items():
        results[label] = {
            "prompt_tok_s": statistics.median(results[label]["prompt"]),
            "gen_tok_s": statistics.median(results[label]["gen"]),
            "size": path.stat().st_size,
        }
    tensors = source_tensors(HF_DIR)
    layer_bytes = sum(r.nbytes for n, r in tensors.items() if source.spec.layer_of(n) is not None)
    total = sum(r.nbytes for r in tensors.values())
    results["removed_share"] = REMOVE / 30 * layer_bytes / total
    return results


def report(reps: int = 5) -> str:
    ensure_hf_copy()
    if not (WORK / "scores.json").is_file():
        subprocess.run(
            [sys.executable, "-m", "shortgpt_export", "score", "--out", str(WORK), "--force"],
            check=True,
            capture_output=True,
        )
    s = speed(reps=reps)
    ideal = 1 / (1 - s["removed_share"])
    lines = [
        "## llama.cpp speed of pruned GGUF files",
        "",
        "The F16 GGUF export's speed and memory are in the next section (load cache, import "
        "cost and export throughput).",
        "",
        f"llama.cpp {__import__('llama_cpp').__version__}, CPU, 2 threads, Q4_K_M quantized "
        f"from F16, prompt 128 tokens, 64 generated; median of {reps} after a warm-up:",
        "",
        "| file | size MB | prompt tok/s | generation tok/s |",
        "|---|---:|---:|---:|",
    ]
    for label in ("unpruned", "pruned"):
        r = s[label]
        name = "30 layers" if label == "unpruned" else f"{30 - REMOVE} layers (BI-pruned)"
        lines.append(
            f"| {name} | {r['size'] / 1e6:,.1f} | {r['prompt_tok_s']:,.0f} | "
            f"{r['gen_tok_s']:,.1f} |"
        )
    gen = s["pruned"]["gen_tok_s"] / s["unpruned"]["gen_tok_s"]
    pp = s["pruned"]["prompt_tok_s"] / s["unpruned"]["prompt_tok_s"]
    lines += [
        "",
        f"Speed-up: generation {gen:.2f}x, prompt {pp:.2f}x; ideal from the share of "
        f"weights removed ({s['removed_share']:.1%}, embeddings and head stay): "
        f"{ideal:.2f}x.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--probe")
    args = parser.parse_args()
    if args.probe:
        memory_probe(args.probe)
    else:
        print(report())
