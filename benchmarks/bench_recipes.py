"""Selection strategies x healing on the default model (issue 11), side by side.

Default model (SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to fp32 torch), CPU.
Calibration: the TAIL of the WikiText-2 test split (49,152 tokens in windows of 512);
evaluation: 40 windows of 512 from its HEAD, disjoint from the calibration tokens. For N =
4, 7, 8 removed layers: perplexity of score (bi), score (angular), block and greedy, each
with every heal in HEALS, the seconds each recipe took (selection + healing, not the
evaluation) and the exact match of the built-in QA (shortgpt_export/validation/qa.py,
first BENCH_QA questions) on the pruned torch model. Greedy's picks for smaller N are
prefixes of N = 8's, so one greedy run serves all N (its seconds for N: the sum of its
first N steps); greedy picks are healed afterwards, as the tool does with its default
--select-tokens.

The run can be done in pieces: every finished row is written to results/recipes.json at
once and a rerun skips the rows (and greedy steps) already there; delete the file (or set
BENCH_FRESH=1) to start over.

    python benchmarks/bench_recipes.py            # run what is missing, then print
    python benchmarks/bench_recipes.py --render   # only re-render from results/recipes.json

BENCH_EVAL_WINDOWS, BENCH_CALIB_TOKENS, BENCH_GREEDY_TOKENS, BENCH_QA (0: no QA) and
BENCH_ONLY (comma-separated "strategy:n", e.g. "score-bi:7,block:7") shrink the run on a
busy machine (RESULTS.md says what was measured).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from shortgpt_export.calibration import CalibrationSet
from shortgpt_export.healing import heal_linear, patched_loss
from shortgpt_export.layerwise import Stack
from shortgpt_export.planning import make_plan
from shortgpt_export.scoring import score_layers
from shortgpt_export.selection import (
    GreedyStep,
    block_plan,
    greedy_plan,
    greedy_steps,
    healed_block_plan,
)
from shortgpt_export.source import load_model, resolve_source

HERE = Path(__file__).resolve().parent
WIKITEXT = HERE.parents[1] / "shared" / "data" / "wikitext-2-raw-test.txt"
RAW = HERE / "results" / "recipes.json"
NS = (4, 7, 8)
EVAL_WINDOWS, EVAL_LEN = 40, 512
EVAL_WINDOWS = int(os.environ.get("BENCH_EVAL_WINDOWS", EVAL_WINDOWS))
CALIB_TOKENS = int(os.environ.get("BENCH_CALIB_TOKENS", 49152))
SELECT_TOKENS = int(os.environ.get("BENCH_GREEDY_TOKENS", 512))
QA_QUESTIONS = int(os.environ.get("BENCH_QA", 20))
SEQ_LEN = int(os.environ.get("BENCH_SEQ_LEN", 512))
BATCH = 4
ORDER = (7, 4, 8)  # N = 7 first: the headline figure
STRATEGIES = ("score-bi", "score-angular", "block", "greedy")
RUN_ORDER = ("score-bi", "block", "greedy", "score-angular")  # angular: one more scoring pass
GREEDY_CANDIDATES = int(os.environ.get("BENCH_GREEDY_CANDIDATES", 0)) or None
# heal name -> heal_linear keyword arguments (None: no healing)
ALL_HEALS = {
    "none": None,
    "linear": {"guard": True},
    "linear+refit": {"guard": True, "refit": True},
}
HEALS = {k: ALL_HEALS[k] for k in os.environ.get("BENCH_HEALS", "none,linear").split(",") if k}


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
        return math.exp(patched_loss(self.stack, self.batches, self.states, keep, weights))


def save(results: dict) -> None:
    RAW.parent.mkdir(exist_ok=True)
    RAW.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


def config() -> dict:
    extra = {"greedy_candidates": GREEDY_CANDIDATES} if GREEDY_CANDIDATES else {}
    return extra | {
        "eval": f"{EVAL_WINDOWS} windows of {EVAL_LEN} from the head",
        "calibration_tokens": CALIB_TOKENS,
        "calibration_window": SEQ_LEN,
        "greedy_tokens": SELECT_TOKENS,
        "qa_questions": QA_QUESTIONS,
        "heals": {k: v for k, v in HEALS.items() if v is not None},
    }


def wanted() -> list[tuple[str, int]]:
    only = os.environ.get("BENCH_ONLY")
    if only:
        return [(item.split(":")[0], int(item.split(":")[1])) for item in only.split(",")]
    return [(strategy, n) for n in ORDER for strategy in RUN_ORDER]


def measure() -> dict:
    torch.manual_seed(0)
    results: dict = {"config": config(), "rows": []}
    if RAW.is_file() and not os.environ.get("BENCH_FRESH"):
        cached = json.loads(RAW.read_text())
        if cached.get("config") == results["config"]:
            results = cached
    done = {(r["strategy"], r["n"], r["heal"]) for r in results["rows"]}
    loaded = load_model(resolve_source(None), device="cpu", dtype="float32")
    model, spec = loaded.model, loaded.source.spec
    results["threads"] = torch.get_num_threads()
    ids = loaded.tokenizer(WIKITEXT.read_text("utf-8"), add_special_tokens=False)["input_ids"]
    head = EVAL_WINDOWS * EVAL_LEN
    assert head + CALIB_TOKENS < len(ids), "evaluation and calibration would overlap"
    evalset = windows(ids, EVAL_WINDOWS, EVAL_LEN)
    calib = windows(ids[-CALIB_TOKENS:], CALIB_TOKENS // SEQ_LEN, SEQ_LEN)
    select = windows(calib.input_ids.flatten().tolist(), SELECT_TOKENS // SEQ_LEN, SEQ_LEN)
    evaluator = Evaluator(loaded, evalset)
    if "base" not in results:
        results["base"] = {"perplexity": evaluator.perplexity(list(range(30)))}
        results["base"].update(qa(loaded, list(range(30)), None))
        print("base", results["base"], flush=True)
        save(results)

    def scores(metric: str):
        cache = results.setdefault("scores", {})
        if metric not in cache:
            t0 = time.perf_counter()
            values, distances = score_layers(model, spec, calib, metric=metric, blocks=True)
            cache[metric] = [values, distances, time.perf_counter() - t0]
            save(results)
        return cache[metric]

    def greedy_order(n: int) -> tuple[list[GreedyStep], float]:
        steps = [GreedyStep(**s) for s in results.get("greedy_steps", [])]
        if len(steps) < n:
            ranking = scores("bi")[0] if GREEDY_CANDIDATES else None
            generator = greedy_steps(
                model,
                spec,
                select,
                batch_size=BATCH,
                scores=ranking,
                max_candidates=GREEDY_CANDIDATES,
            )
            for k, step in enumerate(generator):
                if k < len(steps):  # recomputed: the cache ended mid-run
                    continue
                steps.append(step)
                print(f"greedy step {len(steps)}: layer {step.layer}, {step.seconds:.1f} s",
                      flush=True)  # fmt: skip
                results["greedy_steps"] = [vars(s) for s in steps]
                save(results)
                if len(steps) >= max(NS):
                    break
            generator.close()
        return steps[:n], sum(s.seconds for s in steps[:n])

    def plan_for(strategy: str, n: int):
        if strategy == "greedy":
            steps, seconds = greedy_order(n)
            return greedy_plan(30, steps, None, heal=False), seconds
        metric = "angular" if strategy == "score-angular" else "bi"
        values, distances, seconds = scores(metric)
        if strategy == "block":
            return block_plan(30, distances, n, values), seconds
        return make_plan(30, values, remove=n, metric=metric), seconds

    fitset: dict = {}

    def cached() -> Cached:
        if "cached" not in fitset:
            fitset["cached"] = Cached(loaded, calib)
        return fitset["cached"]

    def healed_block(n: int, kwargs: dict):
        """The tool's --select block with healing: the closest blocks healed, best kept."""
        values, distances, seconds = scores("bi")
        began = time.perf_counter()
        plan, result = healed_block_plan(
            model,
            spec,
            calib,
            distances,
            n,
            values,
            heal_options=kwargs,
            batches=cached().batches,
            original_states=cached().states,
        )
        return plan, result, seconds + time.perf_counter() - began

    def heal(plan, kwargs):
        return heal_linear(
            model,
            spec,
            calib,
            plan.remove,
            batches=cached().batches,
            original_states=cached().states,
            **kwargs,
        )

    for strategy, n in wanted():
        for name, kwargs in HEALS.items():
            if (strategy, n, name) in done:
                continue
            if strategy == "block" and kwargs is not None:
                plan, result, seconds = healed_block(n, kwargs)
            else:
                plan, seconds = plan_for(strategy, n)
                twin = same_score_plan(results["rows"], strategy, plan.remove, name)
                if twin is not None:  # the same model as a row already measured
                    row = reused_row(twin, strategy, n, seconds, scores)
                    results["rows"].append(row)
                    print(json.dumps({k: row[k] for k in ("strategy", "n", "heal", "same_as")}))
                    save(results)
                    continue
                result = heal(plan, kwargs) if kwargs is not None else None
                seconds += result.seconds if result else 0.0
            weights = result.weights if result else None
            row = {
                "strategy": strategy,
                "n": n,
                "heal": name,
                "remove": plan.remove,
                "perplexity": evaluator.perplexity(plan.keep, weights),
                "seconds": round(seconds, 2),
            }
            if plan.selection and "candidates" in plan.selection:
                row["candidates"] = plan.selection["candidates"]
            if result:
                row["fits"] = result.runs
                row["refit"] = result.refit
                row["patched"] = sorted(result.weights)
            row.update(qa(loaded, plan.keep, weights))
            results["rows"].append(row)
            shown = ("strategy", "n", "heal", "perplexity", "seconds", "qa_correct")
            print(json.dumps({k: row[k] for k in shown}), flush=True)
            save(results)
    return results


def same_score_plan(rows: list[dict], strategy: str, remove: list[int], heal: str):
    """A measured score-bi/score-angular row that removed the same layers with the same
    heal: the pruned (and healed: the fit is deterministic) model is the same one."""
    if not strategy.startswith("score-"):
        return None
    return next(
        (
            r
            for r in rows
            if r["strategy"].startswith("score-")
            and r["strategy"] != strategy
            and r["heal"] == heal
            and r["remove"] == remove
            and "same_as" not in r
        ),
        None,
    )


def reused_row(twin: dict, strategy: str, n: int, select_seconds: float, scores) -> dict:
    """``twin``'s measurements under ``strategy``; seconds: this strategy's scoring pass
    plus the twin's healing (its seconds less its own scoring pass)."""
    twin_metric = twin["strategy"].removeprefix("score-")
    heal_seconds = twin["seconds"] - scores(twin_metric)[2]
    row = {k: v for k, v in twin.items() if k not in ("strategy", "n", "seconds")}
    row.update(strategy=strategy, n=n, same_as=twin["strategy"])
    row["seconds"] = round(select_seconds + heal_seconds, 2)
    return row


def qa(loaded, keep: list[int], weights) -> dict:
    """Exact match of the first QA_QUESTIONS built-in questions on the pruned torch model."""
    from shortgpt_export.pruning import healed, pruned_view
    from shortgpt_export.validation.qa import torch_qa

    if not QA_QUESTIONS:
        return {"qa_correct": None}
    with (
        healed(loaded.model, keep, weights),
        pruned_view(loaded.model, loaded.source.spec, keep) as model,
    ):
        result = torch_qa(model, loaded.tokenizer, limit=QA_QUESTIONS)
    return {"qa_correct": result.correct, "qa_total": result.total, "qa_answers": result.answers}


def removed_cell(heals: list[str], rows: list) -> str:
    """The layers removed; per heal where they differ (block chooses after healing)."""
    removals = [(h, r["remove"]) for h, r in zip(heals, rows, strict=True) if r]
    if len({tuple(remove) for _, remove in removals}) == 1:
        return str(removals[0][1])
    return "; ".join(f"{h}: {remove}" for h, remove in removals)


def render(results: dict) -> str:
    base = results["base"]
    cfg = results["config"]
    heals = ["none", *cfg["heals"]]
    rows = {(r["strategy"], r["n"], r["heal"]): r for r in results["rows"]}
    qa_total = base.get("qa_total")
    lines = [
        "## Layer selection and healing (issue 11)",
        "",
        f"Default model (SmolLM2-135M-Instruct, fp32 torch, CPU). Evaluation: {cfg['eval']} of "
        f"the WikiText-2 test split; calibration: its last {cfg['calibration_tokens']:,} tokens "
        f"(windows of {cfg.get('calibration_window', 256)}, disjoint from the evaluation); "
        f"greedy selection (SLEB, next-token loss) on the first {cfg['greedy_tokens']:,} of "
        "them"
        + (
            f", trying the {cfg['greedy_candidates']} lowest-BI kept layers at each step"
            if cfg.get("greedy_candidates")
            else ""
        )
        + ", its picks healed afterwards. "
        "Heals: `linear` is one ridge least-squares patch per removed run, merged into the "
        "down projection of the kept layer before it, kept only if it lowers the next-token "
        "loss on held-out calibration windows (every 4th batch, not used for the fit)"
        + (
            "; `linear+refit` (`--heal refit`) also refits the down projection of every kept "
            "layer after the first cut against the original's hidden state at the matching "
            "depth (same guard)"
            if "linear+refit" in cfg["heals"]
            else ""
        )
        + ". `block` with a heal is what `--select block` does then: the 4 closest blocks "
        "are each healed and the one with the lowest held-out loss after healing is removed. "
        f"Original model: perplexity {base['perplexity']:.2f} on these windows"
        + (f", QA {base['qa_correct']}/{qa_total}" if qa_total else "")
        + ". QA: exact match on the first "
        f"{qa_total} built-in questions (torch, greedy). Seconds: selection plus healing "
        "(greedy: the sum of its first N steps; score and block: the scoring pass), not the "
        "evaluation.",
        "",
        "| strategy | N | "
        + " | ".join(f"ppl {h}" for h in heals)
        + " | "
        + " | ".join(f"QA {h}" for h in heals)
        + " | "
        + " | ".join(f"s {h}" for h in heals)
        + " | removed |",
        "|---|---:|" + "---:|" * (3 * len(heals)) + "---|",
    ]

    def cell(row, key, fmt):
        return format(row[key], fmt) if row and row.get(key) is not None else "-"

    for strategy in STRATEGIES:
        for n in NS:
            got = [rows.get((strategy, n, h)) for h in heals]
            if not any(got):
                continue
            lines.append(
                f"| {strategy} | {n} | "
                + " | ".join(cell(r, "perplexity", ".2f") for r in got)
                + " | "
                + " | ".join(cell(r, "qa_correct", "d") for r in got)
                + " | "
                + " | ".join(cell(r, "seconds", ".0f") for r in got)
                + f" | {removed_cell(heals, got)} |"
            )
    missing = []
    for strategy in STRATEGIES:
        for n in NS:
            absent = [h for h in heals if (strategy, n, h) not in rows]
            if absent:
                missing.append(f"{strategy} N={n} ({', '.join(absent)})")
    if missing:
        lines.append(f"\nNot measured in this run (time ran out): {', '.join(missing)}.")
    twins = sorted(
        {(r["strategy"], r["n"], r["same_as"]) for r in results["rows"] if "same_as" in r}
    )
    if twins:
        lines.append(
            "\nSame layers as another score row, so the same model (the heal is "
            "deterministic); its perplexity and QA are that row's: "
            + "; ".join(f"{s} N={n} as {t}" for s, n, t in twins)
            + "."
        )
    steps = results.get("greedy_steps")
    if steps:
        lines.append(
            f"\nGreedy: {sum(s['seconds'] for s in steps):.0f} s for {len(steps)} removals "
            f"(order {[s['layer'] for s in steps]}); seconds per removed layer: "
            + ", ".join(format(s["seconds"], ".0f") for s in steps)
            + "."
            + (f" ({results['greedy_note']}.)" if results.get("greedy_note") else "")
        )
    rejected = []
    for (strategy, n, heal), row in sorted(rows.items()):
        runs = [f["run"] for f in row.get("fits", []) if "guard" in f.get("skipped", "")]
        if runs:
            rejected.append(f"{strategy} N={n} {heal}: runs {runs}")
    if rejected:
        lines.append("\nPatches the held-out guard rejected: " + "; ".join(rejected) + ".")
    undone = [
        f"{strategy} N={n}"
        for (strategy, n, heal), row in sorted(rows.items())
        if isinstance(row.get("refit"), dict) and not row["refit"]["kept"]
    ]
    if undone:
        lines.append(
            "\nRefits the guard undid (held-out loss not lower): " + ", ".join(undone) + "."
        )
    lines.append(
        "\nThe 2 CPU cores were shared with other jobs during this run, so all seconds are "
        "upper bounds, several times what an idle machine takes."
    )
    return "\n".join(lines) + "\n"


def report() -> str:
    return render(measure())


if __name__ == "__main__":
    if sys.argv[1:] == ["--render"]:
        print(render(json.loads(RAW.read_text())))
    else:
        print(report())
