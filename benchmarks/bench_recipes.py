"""Selection strategies x healing on the default model (issue 11), side by side.

Default model (SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to fp32 torch), CPU.
Calibration: the TAIL of the WikiText-2 test split (windows of 256); evaluation: 40
windows of 512 from its HEAD, disjoint from the calibration tokens. For N = 4, 7, 8 removed
layers: perplexity of score (bi), score (angular), block and greedy, each with heal none
and linear, and the seconds each recipe took (selection + healing, not the evaluation).
Greedy's picks for smaller N are prefixes of N = 8's, so one greedy run per heal setting
serves all N; its seconds for N are the sum of its first N steps.

    python benchmarks/bench_recipes.py            # run, then print the section
    python benchmarks/bench_recipes.py --render   # only re-render from results/recipes.json

BENCH_EVAL_WINDOWS, BENCH_CALIB_TOKENS and BENCH_GREEDY_TOKENS shrink the run on a busy
machine (RESULTS.md says what was measured).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from shortgpt_export.architectures import submodule
from shortgpt_export.calibration import CalibrationSet
from shortgpt_export.healing import heal_linear
from shortgpt_export.layerwise import Stack
from shortgpt_export.planning import make_plan
from shortgpt_export.scoring import score_layers
from shortgpt_export.selection import GreedyStep, block_plan, greedy_plan, greedy_steps
from shortgpt_export.source import load_model, resolve_source

HERE = Path(__file__).resolve().parent
WIKITEXT = HERE.parents[1] / "shared" / "data" / "wikitext-2-raw-test.txt"
# BENCH_PART=greedy|scored runs half of the recipes (two processes on a busy machine);
# greedy-given evaluates the prefixes of BENCH_GREEDY_ORDER, a greedy run stopped early
PART = os.environ.get("BENCH_PART", "all")
RAW = HERE / "results" / ("recipes.json" if PART in ("all", "greedy") else f"recipes-{PART}.json")
NS = (4, 7, 8)
EVAL_WINDOWS, EVAL_LEN = 40, 512
EVAL_WINDOWS = int(os.environ.get("BENCH_EVAL_WINDOWS", EVAL_WINDOWS))
CALIB_TOKENS = int(os.environ.get("BENCH_CALIB_TOKENS", 8192))
SELECT_TOKENS = int(os.environ.get("BENCH_GREEDY_TOKENS", 2048))
SEQ_LEN, BATCH = 256, 4
ORDER = (7, 4, 8)  # N = 7 first: the issue's headline figure
# pilot, BI 7 of 30, 8 eval windows: ppl 65.8 unweighted, 64.0 token-weighted
WEIGHTING = "token"
STRATEGIES = ("score-bi", "score-angular", "block", "greedy", "greedy, healed after")


def windows(ids: list[int], rows: int, length: int) -> CalibrationSet:
    tensor = torch.tensor(ids[: rows * length]).view(rows, length)
    return CalibrationSet(tensor, torch.ones_like(tensor), "wikitext-2 test", length)


class Cached:
    """Windows with the original model's state entering every block (``states[i][batch]``)."""

    def __init__(self, loaded, windows_: CalibrationSet):
        self.spec = loaded.source.spec
        self.stack = Stack(loaded.model, self.spec)
        with torch.inference_mode():
            self.batches = self.stack.record(windows_, BATCH)
            self.states = [[b.embeds for b in self.batches]]
            for index in range(len(self.stack.layers)):
                self.states.append(
                    [
                        self.stack.run(index, h, b)
                        for h, b in zip(self.states[-1], self.batches, strict=True)
                    ]
                )


class Evaluator(Cached):
    """Perplexity on fixed windows; a pruned model runs only from its first removed (or
    patched) layer on."""

    def perplexity(self, keep: list[int], weights: dict | None = None) -> float:
        n = len(self.stack.layers)
        weights = weights or {}
        touched = (set(range(n)) - set(keep)) | set(weights)
        start = min(touched) if touched else n
        saved = {}
        total, count = 0.0, 0
        try:
            with torch.inference_mode():
                for p, w in weights.items():
                    linear = submodule(self.stack.layers[p], self.spec.down_proj_path)
                    saved[p] = linear.weight.data
                    linear.weight.data = w.to(saved[p].dtype)
                for h, batch in zip(self.states[start], self.batches, strict=True):
                    h = self.stack.run_many([i for i in keep if i >= start], h, batch)
                    s, c = self.stack.loss_sums(h, batch)
                    total, count = total + s, count + c
        finally:
            for p, data in saved.items():
                submodule(self.stack.layers[p], self.spec.down_proj_path).weight.data = data
        return math.exp(total / count)


def save(results: dict) -> None:
    RAW.parent.mkdir(exist_ok=True)
    RAW.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


def measure() -> dict:
    torch.manual_seed(0)
    loaded = load_model(resolve_source(None), device="cpu", dtype="float32")
    model, spec = loaded.model, loaded.source.spec
    ids = loaded.tokenizer(WIKITEXT.read_text("utf-8"), add_special_tokens=False)["input_ids"]
    head = EVAL_WINDOWS * EVAL_LEN
    assert head + CALIB_TOKENS < len(ids), "evaluation and calibration would overlap"
    evalset = windows(ids, EVAL_WINDOWS, EVAL_LEN)
    calib = windows(ids[-CALIB_TOKENS:], CALIB_TOKENS // SEQ_LEN, SEQ_LEN)
    select = windows(calib.input_ids.flatten().tolist(), SELECT_TOKENS // SEQ_LEN, SEQ_LEN)
    results: dict = {
        "config": {
            "eval": f"{EVAL_WINDOWS} windows of {EVAL_LEN} from the head",
            "calibration_tokens": CALIB_TOKENS,
            "greedy_tokens": SELECT_TOKENS,
            "weighting": WEIGHTING,
            "threads": torch.get_num_threads(),
            "tokens_total": len(ids),
        },
        "rows": [],
    }
    began = time.perf_counter()
    evaluator = Evaluator(loaded, evalset)
    results["base"] = {"perplexity": evaluator.perplexity(list(range(30))),
                       "seconds": time.perf_counter() - began}  # fmt: skip
    print("base", results["base"], flush=True)
    save(results)

    t0 = time.perf_counter()
    bi, distances = (
        (None, None)
        if PART == "greedy-given"
        else score_layers(model, spec, calib, metric="bi", blocks=True)
    )
    t_bi = time.perf_counter() - t0
    angular: dict = {}

    def plan_for(strategy: str, n: int):
        if strategy == "score-bi":
            return make_plan(30, bi, remove=n), t_bi
        if strategy == "block":
            return block_plan(30, distances, n, bi), t_bi
        if not angular:
            t0 = time.perf_counter()
            angular["scores"] = score_layers(model, spec, calib, metric="angular")
            angular["seconds"] = time.perf_counter() - t0
        return make_plan(30, angular["scores"], remove=n, metric="angular"), angular["seconds"]

    def record(strategy, n, heal, plan, seconds, heal_result=None):
        weights = heal_result.weights if heal_result else None
        row = {
            "strategy": strategy,
            "n": n,
            "heal": heal,
            "remove": plan.remove,
            "perplexity": evaluator.perplexity(plan.keep, weights),
            "seconds": round(seconds + (heal_result.seconds if heal_result else 0.0), 2),
        }
        if heal_result:
            row["fits"] = heal_result.runs
        if plan.selection:
            row["selection"] = plan.selection
        results["rows"].append(row)
        print(
            json.dumps({k: v for k, v in row.items() if k not in ("fits", "selection")}), flush=True
        )
        save(results)

    fitset = Cached(loaded, calib)

    def heal(plan):
        return heal_linear(
            model,
            spec,
            calib,
            plan.remove,
            weighting=WEIGHTING,
            batches=fitset.batches,
            original_states=fitset.states,
        )

    def scored(strategy, ns):
        for n in ns:
            plan, seconds = plan_for(strategy, n)
            record(strategy, n, "none", plan, seconds)
            record(strategy, n, "linear", plan, seconds, heal(plan))

    def greedy(heal_mode):
        steps = []
        in_loop = heal_mode == "linear"
        given = os.environ.get("BENCH_GREEDY_ORDER")
        if given:  # the order (and seconds) of a greedy run that was stopped early
            seconds = json.loads(RAW.with_name("recipes.json").read_text())
            seconds = seconds[f"greedy_{heal_mode}_seconds_per_step"]
            generator = iter(
                [
                    GreedyStep(int(layer), float("nan"), s)
                    for layer, s in zip(given.split(","), seconds, strict=False)
                ]
            )
            results[f"greedy_{heal_mode}_seconds_per_step"] = seconds
        else:
            generator = greedy_steps(
                model, spec, select, heal=in_loop, weighting=WEIGHTING, batch_size=BATCH
            )
        for step in generator:
            steps.append(step)
            print(f"greedy ({heal_mode}) step {len(steps)}: layer {step.layer}, "
                  f"{step.seconds:.1f} s", flush=True)  # fmt: skip
            results[f"greedy_{heal_mode}_seconds_per_step"] = [round(s.seconds, 2) for s in steps]
            save(results)
            if len(steps) == max(NS):
                break
        if not given:
            generator.close()
        for n in (n for n in ORDER if n <= len(steps)):
            plan = greedy_plan(30, steps[:n], bi, heal=in_loop)
            seconds = sum(s.seconds for s in steps[:n])
            if in_loop:
                record("greedy", n, "linear", plan, seconds, heal(plan))
            else:
                record("greedy", n, "none", plan, seconds)
                record("greedy, healed after", n, "linear", plan, seconds, heal(plan))

    # most telling first, so that a run cut short still answers the main questions
    if PART == "greedy-given":
        greedy("linear")
    if PART in ("all", "greedy"):
        scored("score-bi", [7])
        greedy("linear")
    if PART in ("all", "scored"):
        scored("score-bi", [4, 8])
        scored("block", [7])
        scored("score-angular", [7])
    if PART in ("all", "greedy"):
        greedy("none")
    if PART in ("all", "scored"):
        scored("block", [4, 8])
        scored("score-angular", [4, 8])
    return results


def render(results: dict) -> str:
    base = results["base"]["perplexity"]
    cfg = results["config"]
    rows = {(r["strategy"], r["n"], r["heal"]): r for r in results["rows"]}
    lines = [
        "## Layer selection and healing (issue 11)",
        "",
        f"Default model (SmolLM2-135M-Instruct, fp32 torch, CPU). Evaluation: {cfg['eval']} of "
        f"the WikiText-2 test split; calibration: its last {cfg['calibration_tokens']:,} tokens "
        f"(windows of 256, disjoint from the evaluation); greedy selection on the first "
        f"{cfg['greedy_tokens']:,} of them. Healing: ridge least squares, tokens weighted by "
        f"1/|y|^2 (`{cfg.get('weighting', 'none')}`). Original model: perplexity {base:.2f} on "
        "these windows. `greedy` with heal linear chooses each layer by its loss after the "
        "patch its removal gets (heal in the loop); `greedy, healed after` heals the plain "
        "greedy picks. Seconds: selection plus healing (greedy: the sum of its first N steps; "
        "score and block: the scoring pass), not the evaluation.",
        "",
        "| strategy | N | ppl, heal none | ppl, heal linear | s, none | s, linear "
        "| removed (heal linear) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for strategy in STRATEGIES:
        for n in NS:
            plain, healed = rows.get((strategy, n, "none")), rows.get((strategy, n, "linear"))
            if not plain and not healed:
                continue

            def cell(row, key, fmt):
                return format(row[key], fmt) if row else "-"

            lines.append(
                f"| {strategy} | {n} | {cell(plain, 'perplexity', '.2f')} | "
                f"{cell(healed, 'perplexity', '.2f')} | {cell(plain, 'seconds', '.0f')} | "
                f"{cell(healed, 'seconds', '.0f')} | {(healed or plain)['remove']} |"
            )
    missing = [
        f"{strategy} N={n}"
        for strategy in STRATEGIES
        for n in NS
        if (strategy, n, "none") not in rows and (strategy, n, "linear") not in rows
    ]
    if missing:
        lines.append(f"\nNot measured in this run (time ran out): {', '.join(missing)}.")
    for heal in ("linear", "none"):
        per_step = results.get(f"greedy_{heal}_seconds_per_step")
        if per_step:
            lines.append(
                f"\nGreedy (heal {heal}): {sum(per_step):.0f} s for {len(per_step)} removals; "
                f"seconds per removed layer: {', '.join(f'{s:.0f}' for s in per_step)}."
            )
    for (strategy, n, heal), row in sorted(rows.items()):
        plain = rows.get((strategy, n, "none"))
        if heal == "linear" and plain and row["perplexity"] > plain["perplexity"]:
            lines.append(
                f"\nHealing made {strategy} N={n} worse ({plain['perplexity']:.1f} -> "
                f"{row['perplexity']:.1f}): a known failure of the token-weighted fit."
            )
    lines.append(
        "\nThe 2 CPU cores were shared with 3-4 other jobs during this run (each process got "
        "about 0.3-0.5 of a core), so all seconds are upper bounds, several times what an idle "
        "machine takes."
    )
    return "\n".join(lines) + "\n"


def merged() -> dict:
    """results/recipes.json with the rows of any part run beside it."""
    results = json.loads((HERE / "results" / "recipes.json").read_text())
    for extra in sorted((HERE / "results").glob("recipes-*.json")):
        results["rows"] += json.loads(extra.read_text())["rows"]
    return results


def report() -> str:
    return render(measure())


if __name__ == "__main__":
    if sys.argv[1:] == ["--render"]:
        print(render(merged()))
    else:
        print(report())
