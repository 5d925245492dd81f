"""The README.md written beside every pruned model."""

from __future__ import annotations

from .planning import Plan


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
        f"Metric: `{plan.metric}` (Block Influence = 1 - mean cosine similarity "
        "between a layer's input and output hidden state; Men et al. 2024, arXiv 2403.03853).",
    ]
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
