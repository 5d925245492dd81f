"""report.json, report.md and the PNG plots."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from .scoring import METRIC_TEXT

log = logging.getLogger(__name__)

COLUMNS = (
    ("perplexity", "perplexity", "{:,.2f}"), ("kl_divergence", "KL vs original", "{:.4f}"),
    ("top1_agreement", "top-1 agreement", "{:.3f}"), ("qa_accuracy", "QA exact match", "{:.0%}"),
    ("size_bytes", "size MB", "{:,.1f}"),
    ("prompt_tok_s", "prompt tok/s", "{:,.0f}"), ("gen_tok_s", "gen tok/s", "{:,.1f}"),
    ("ttft_s", "TTFT s", "{:.3f}"), ("peak_rss_bytes", "peak RSS MB", "{:,.0f}"),
    ("rss_growth_bytes", "model RSS MB", "{:,.0f}"),
)  # fmt: skip
TABLE_HEADER = ["artifact", "quant"] + [title for _, title, _ in COLUMNS]
MEMORY_NOTE = (
    "Memory: each artifact loads and generates in its own worker process. Peak RSS is that "
    "process at its highest (Python and its libraries included); model RSS is the peak minus "
    "the RSS before loading, what the model itself costs. Torch rows run in the pipeline's "
    "own process and have no memory figures."
)


def _cell(record: dict, key: str, fmt: str) -> str:
    value = record.get(key)
    if value is None:
        return "-"
    if key.endswith("_bytes"):
        value = value / 1e6
    return fmt.format(value)


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """The lines of a Markdown table."""
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def table_rows(artifacts: list[dict]) -> list[list[str]]:
    return [
        [a["label"], a.get("quant") or "-"] + [_cell(a, k, f) for k, _, f in COLUMNS]
        for a in artifacts
    ]


# Accelerators get agreement and latency; perplexity and memory stay CPU figures.
ACCELERATOR_COLUMNS = tuple(
    column
    for column in COLUMNS
    if column[0] in ("kl_divergence", "top1_agreement", "prompt_tok_s", "gen_tok_s", "ttft_s")
)
ACCELERATOR_HEADER = (
    ["artifact", "quant", "device", "back-end"]
    + [title for _, title, _ in ACCELERATOR_COLUMNS]
    + ["gen speed vs CPU"]
)


def accelerator_rows(artifacts: list[dict]) -> list[list[str]]:
    """One row per artifact and accelerator; a failed accelerator shows its error."""
    rows = []
    for a in artifacts:
        for acc in a.get("accelerators", []):
            head = [a["label"], a.get("quant") or "-", acc["device"]]
            if "error" in acc:
                failed = [f"failed: {acc['error']}"]
                rows.append(head + failed + [""] * (len(ACCELERATOR_HEADER) - len(head) - 1))
                continue
            cells = [_cell(acc, k, f) for k, _, f in ACCELERATOR_COLUMNS]
            speedup = f"{acc['gen_tok_s'] / a['gen_tok_s']:.2f}x"
            rows.append(head + [acc["backend"], *cells, speedup])
    return rows


def devices_note(report: dict) -> str:
    """Where the latency figures come from, including when no accelerator was found."""
    arts = report["artifacts"]
    if any(a.get("accelerators") for a in arts):
        return "Accelerator figures are in addition to the CPU figures above."
    if report["eval"].get("devices", "auto") == "cpu":
        return "Latency measured on the CPU only (--devices cpu)."
    return (
        "Latency measured on the CPU only: no accelerator (llama.cpp Metal/CUDA, onnxruntime "
        "CoreML/CUDA, torch CUDA/MPS) was found for these back-ends on this machine."
    )


def quant_factors(artifacts: list[dict]) -> list[str]:
    """One line per quant type: the perplexity factor it adds, pruned vs. original."""
    lines = []
    base = {a["pruned"]: a for a in artifacts if a["format"] == "hf"}
    for quant in dict.fromkeys(a["quant"] for a in artifacts if a["format"] != "hf"):
        pair = {a["pruned"]: a for a in artifacts if a["quant"] == quant and a["format"] != "hf"}
        if True in pair and False in pair and True in base and False in base:
            pruned = pair[True]["perplexity"] / base[True]["perplexity"]
            original = pair[False]["perplexity"] / base[False]["perplexity"]
            lines.append(
                f"{quant} multiplies perplexity by {pruned:.3f} on the pruned model and "
                f"by {original:.3f} on the original."
            )
    return lines


LAYER_BY_LAYER_NOTE = (
    "The torch rows were computed one decoder layer in memory at a time (`--offload "
    "layers`): perplexity and agreement only. Their latency, memory and QA are not "
    "measured: generating would load every layer once per token."
)

QA_SHOWN = 5  # questions in report.md's side-by-side


def _one_line(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|") or "(empty)"


def qa_side_by_side(artifacts: list[dict], shown: int = QA_SHOWN) -> list[str]:
    """The first questions with the original's and the pruned model's replies (torch
    rows when there are any), each marked right or wrong; nothing without QA figures."""
    from .validation.qa import questions

    asked = [a for a in artifacts if a.get("qa_answers")]
    pair = [
        next((a for a in asked if a["pruned"] == pruned and a["format"] == "hf"), None)
        or next((a for a in asked if a["pruned"] == pruned), None)
        for pruned in (False, True)
    ]
    pair = [a for a in pair if a is not None]
    if not pair:
        return []
    items = questions()[: min(shown, *(len(a["qa_answers"]) for a in pair))]
    header = ["question", "accepted"] + [f"{a['label']} ({a.get('quant') or '-'})" for a in pair]
    rows = [
        [_one_line(item.question), " / ".join(item.answers)]
        + [("✓ " if a["qa_matched"][i] else "✗ ") + _one_line(a["qa_answers"][i]) for a in pair]
        for i, item in enumerate(items)
    ]
    scores = ", ".join(
        f"{a['label']} ({a.get('quant') or '-'}) {a['qa_correct']}/{a['qa_total']}" for a in pair
    )
    return [
        "## Generation: built-in questions",
        "",
        "Each artifact answers the built-in questions through its own chat template, greedy, "
        "and scores a point when an accepted answer appears as a whole word in the first "
        f"sentence of its reply (QA exact match). Correct: {scores}. The first "
        f"{len(items)}:",
        "",
        *markdown_table(header, rows),
        "",
    ]


def chat_stop_lines(artifacts: list[dict]) -> list[str]:
    """Whether each unpruned artifact's greedy chat reply ends at the end-of-turn token."""
    checked = [a for a in artifacts if a.get("chat_stop")]
    if not checked:
        return []
    lines = ["", "## Chat end-of-turn check (original model, exported the same way)", ""]
    for art in checked:
        stop = art["chat_stop"]
        verdict = (
            f"stops at {stop['end_of_turn']!r} after {stop['tokens']} tokens"
            if stop["stops"]
            else f"does NOT stop at {stop['end_of_turn']!r} within {stop['tokens']} tokens"
        )
        reply = stop["reply"].replace("\n", " ")[:80]
        lines.append(f"- {Path(art['path']).name} ({art['quant']}): {verdict}: {reply!r}")
    return lines


def render_markdown(report: dict) -> str:
    ev = report["eval"]
    lines = [
        "# shortgpt-export validation report",
        "",
        f"Evaluation: {ev['source']}, {ev['tokens']} tokens in windows of {ev['ctx']} "
        f"(KL and top-1 over the first {ev['kl_tokens']}); the same token ids on every "
        "back-end. KL is against the original, unpruned model in torch. Latency: the median "
        f"of {ev['latency_runs']} timed run{'s' * (ev['latency_runs'] != 1)} after a warm-up.",
        "",
    ]
    if ev.get("in_sample"):
        lines += [
            f"**In-sample:** the evaluation text is also the calibration text "
            f"({ev['calibration']}): the layers were chosen (and healed) on it, so these "
            "perplexities and KLs flatter the pruned model. Pass a held-out text with `--eval`.",
            "",
        ]
    elif ev.get("calibration"):
        lines += [f"Calibration text (scoring, selection, healing): {ev['calibration']}.", ""]
    lines += markdown_table(TABLE_HEADER, table_rows(report["artifacts"]))
    lines += ["", *quant_factors(report["artifacts"]), ""]
    accelerated = accelerator_rows(report["artifacts"])
    if accelerated:
        lines += ["## Accelerators", "", *markdown_table(ACCELERATOR_HEADER, accelerated), ""]
    lines += [devices_note(report), "", MEMORY_NOTE, ""]
    if any(a.get("layer_by_layer") for a in report["artifacts"]):
        lines += [LAYER_BY_LAYER_NOTE, ""]
    lines.append(
        "Back-ends: "
        + "; ".join(
            sorted(
                {
                    f"{a['backend']} on {a['device']}, {a['threads']} threads"
                    for a in report["artifacts"]
                }
            )
        )
    )
    lines += chat_stop_lines(report["artifacts"])
    side_by_side = qa_side_by_side(report["artifacts"])
    if side_by_side:
        lines += ["", *side_by_side[:-1]]
    for name in report.get("plots", []):
        lines += ["", f"![{name}]({name})"]
    return "\n".join(lines) + "\n"


def _pyplot():
    """matplotlib's pyplot on a file-only back-end, or None when the ``plots`` extra is not
    installed (the figures are all in report.json and report.md anyway)."""
    try:
        import matplotlib
    except ImportError:
        log.warning("matplotlib is not installed: no plots (pip install 'shortgpt-export[plots]')")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(report: dict, out: Path, scores: dict | None, removed: list[int]) -> list[str]:
    """PNG plots: BI per layer, perplexity vs. size, generation speed. Returns file names."""
    plt = _pyplot()
    if plt is None:
        return []
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    names = []
    arts = report["artifacts"]
    if scores:
        fig, ax = plt.subplots(figsize=(8, 3.5))
        values = scores["scores"]
        colors = ["tab:red" if i in removed else "tab:blue" for i in range(len(values))]
        ax.bar(range(len(values)), values, color=colors)
        ax.set(
            title=f"{scores['metric'].upper()} per layer (red: removed)",
            xlabel="layer",
            ylabel=f"{scores['metric'].upper()} ({METRIC_TEXT[scores['metric']][0]})",
        )
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(
            handles=[Patch(color="tab:red", label="removed"), Patch(color="tab:blue", label="kept")]
        )
        fig.tight_layout()
        fig.savefig(out / "scores.png", dpi=120)
        plt.close(fig)
        names.append("scores.png")
    fig, ax = plt.subplots(figsize=(7, 4))
    for pruned, marker in ((False, "o"), (True, "s")):
        group = [a for a in arts if a["pruned"] == pruned and a.get("size_bytes")]
        ax.scatter(
            [a["size_bytes"] / 1e6 for a in group],
            [a["perplexity"] for a in group],
            marker=marker,
            label="pruned" if pruned else "original",
        )
        for a in group:
            ax.annotate(
                a.get("quant") or a["format"],
                (a["size_bytes"] / 1e6, a["perplexity"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=8,
            )
    ax.set(
        title="Perplexity against file size",
        xlabel="size on disk (MB)",
        ylabel="perplexity (lower is better)",
    )
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "perplexity_vs_size.png", dpi=120)
    plt.close(fig)
    names.append("perplexity_vs_size.png")
    fig, ax = plt.subplots(figsize=(7, 4))
    bars = [
        (a, measured)
        for a in arts
        for measured in [a, *(acc for acc in a.get("accelerators", []) if "error" not in acc)]
        if measured.get("gen_tok_s") is not None  # none for rows evaluated layer by layer
    ][::-1]  # barh draws bottom-up; keep the table's order top-down
    labels = [f"{a['label']} {a.get('quant') or ''} [{m['device']}]" for a, m in bars]
    colors = ["tab:orange" if a["pruned"] else "tab:gray" for a, _ in bars]
    hatches = ["" if m is a else "//" for a, m in bars]
    ax.barh(labels, [m["gen_tok_s"] for _, m in bars], color=colors, hatch=hatches)
    handles = [Patch(color="tab:orange", label="pruned"), Patch(color="tab:gray", label="original")]
    if len(bars) > len(arts):
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="accelerator"))
    ax.set(
        title=f"Generation speed (CPU: {arts[0]['threads']} threads)",
        xlabel="tokens per second (higher is better)",
    )
    ax.legend(handles=handles)
    fig.tight_layout()
    fig.savefig(out / "generation_speed.png", dpi=120)
    plt.close(fig)
    names.append("generation_speed.png")
    return names


def strict_json(value):
    """``value`` with NaN and infinities as null, so the JSON written is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    return value


def write_report(
    report: dict, out: Path, scores: dict | None = None, removed: list[int] | None = None
) -> None:
    report["plots"] = plot(report, out, scores, removed or [])
    text = json.dumps(strict_json(report), indent=2, allow_nan=False)
    (out / "report.json").write_text(text + "\n", encoding="utf-8")
    (out / "report.md").write_text(render_markdown(report), encoding="utf-8")


def budget_plot(budget: dict, path: Path) -> None:
    """Held-out perplexity against layers removed (``--remove auto``), with the limit."""
    plt = _pyplot()
    if plt is None:
        return
    curve = budget["curve"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([c["removed"] for c in curve], [c["perplexity"] for c in curve], marker="o")
    ax.axhline(budget["limit"], color="tab:red", linestyle="--", label="budget")
    ax.axvline(budget["chosen"], color="tab:green", linestyle=":", label="chosen")
    ax.set_xlabel("layers removed")
    ax.set_ylabel("held-out perplexity")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
