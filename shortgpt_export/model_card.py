"""The README.md written beside every pruned model."""

from __future__ import annotations

from .planning import Plan
from .scoring import METRIC_TEXT


def render_model_card(
    *, original: str, architecture: str, plan: Plan, calibration: dict | None, extra: str = ""
) -> str:
    """Markdown model card: what was removed, on which evidence, from which model."""
    kept = len(plan.keep)
    lines = [
        "---",
        "tags: [shortgpt, layer-pruning, shortgpt-export]",
        "---",
        f"# {original}, {kept} of {plan.num_layers} layers",
        "",
        f"Made by shortgpt-export from **{original}** ({architecture}): "
        f"{len(plan.remove)} of {plan.num_layers} decoder layers removed "
        f"({plan.reason}), remaining layers renumbered 0..{kept - 1}.",
        "",
        "| removed layer | score |",
        "|---:|---:|",
    ]
    for index in plan.remove:
        score = f"{plan.scores[index]:.4f}" if plan.scores else "n/a"
        lines.append(f"| {index} | {score} |")
    lines += [
        "",
        f"Metric: `{plan.metric}` ({METRIC_TEXT.get(plan.metric, ('', plan.metric))[1]}).",
    ]
    lines += _recipe_lines(plan)
    if calibration:
        lines.append(
            f"Calibration: {calibration.get('source')}, {calibration.get('tokens')} tokens, "
            f"windows of {calibration.get('seq_len')}."
        )
    lines += [
        "",
        "Removing layers costs quality, and small models lose much more than 7B+ ones. "
        "Measure perplexity on your own data before you ship this model.",
    ]
    if extra:
        lines += ["", extra]
    return "\n".join(lines) + "\n"


def _recipe_lines(plan: Plan) -> list[str]:
    """Selection strategy, what it measured, and the healing fits."""
    lines = ["", f"Selection: `{plan.strategy}`."]
    selection = plan.selection or {}
    if plan.strategy == "greedy" and selection.get("steps"):
        lines += [
            "",
            "| step | removed layer | calibration loss after | seconds |",
            "|---:|---:|---:|---:|",
        ]
        for number, step in enumerate(selection["steps"], 1):
            lines.append(
                f"| {number} | {step['layer']} | {step['loss']:.4f} | {step['seconds']:.1f} |"
            )
    if plan.strategy == "block" and "distance" in selection:
        lines.append(
            f"Block of {len(plan.remove)} from layer {selection['start']}: angular distance "
            f"{selection['distance']:.4f} between its input and output (Gromov et al. 2024)."
        )
    if plan.heal:
        lines += [
            "",
            "Healing: a least-squares linear patch per removed run, merged into the MLP down "
            "projection of the layer before it (the architecture is unchanged).",
            "",
            "| removed run | patched layer | relative residual before | after |",
            "|---|---:|---:|---:|",
        ]
        for run in plan.heal.get("runs", []):
            span = f"{run['run'][0]}..{run['run'][1]}"
            if run.get("patched_layer") is None:
                lines.append(f"| {span} | not healed: {run['skipped']} | | |")
            else:
                lines.append(
                    f"| {span} | {run['patched_layer']} | {run['residual_before']:.4f} "
                    f"| {run['residual_after']:.4f} |"
                )
    if plan.budget:
        b = plan.budget
        lines.append(
            f"\nBudget: {b['chosen']} layers removed, the most whose held-out perplexity stays "
            f"within {b['max_ppl_increase']}x the original's ({b['original_perplexity']:.2f})."
        )
    return lines
