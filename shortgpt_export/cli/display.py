"""Tables the CLI shows: layer scores with bars, the plan, the artifacts."""

from __future__ import annotations

from rich.table import Table

from ..artifacts import Artifact
from ..planning import Plan
from ..scoring import LayerScores

BAR_WIDTH = 30
EIGHTHS = " ▏▎▍▌▋▊▉█"


def bar(fraction: float, width: int = BAR_WIDTH) -> str:
    """A horizontal bar of ``fraction`` (0..1) of ``width`` cells, in eighths of a cell."""
    eighths = max(1, round(max(0.0, min(1.0, fraction)) * width * 8))
    return "█" * (eighths // 8) + (EIGHTHS[eighths % 8] if eighths % 8 else "")


def scores_table(scores: LayerScores, plan: Plan | None = None) -> Table:
    """Layers sorted from least to most influential, each with a bar scaled to the maximum."""
    removed = set(plan.remove) if plan else set()
    table = Table(
        title=f"{scores.metric.upper()} per layer, least influential first "
        f"({scores.calibration.get('tokens', '?')} tokens of "
        f"{scores.calibration.get('source', '?')})"
    )
    for column, justify in (
        ("rank", "right"),
        ("layer", "right"),
        ("score", "right"),
        ("", "left"),
        ("plan", "left"),
    ):
        table.add_column(column, justify=justify)
    finite = [s for s in scores.scores if s == s]
    top = max(finite) if finite else 1.0
    for rank, index in enumerate(scores.ranking(), 1):
        value = scores.scores[index]
        cells = bar(value / top) if top > 0 else ""
        mark = "[red]remove[/red]" if index in removed else ""
        style = "red" if index in removed else "cyan"
        table.add_row(str(rank), str(index), f"{value:.4f}", f"[{style}]{cells}[/{style}]", mark)
    return table


def plan_line(plan: Plan) -> str:
    line = (
        f"plan: {plan.reason}: remove {plan.remove}, keep {len(plan.keep)} of "
        f"{plan.num_layers} layers"
    )
    fits = [r for r in (plan.heal or {}).get("runs", []) if r.get("patched_layer") is not None]
    if plan.heal:
        line += f"; healed {len(fits)} of {len(plan.heal['runs'])} removed runs"
    return line


def artifacts_table(artifacts: list[Artifact], out) -> Table:
    table = Table(title=f"written to {out}")
    for column in ("artifact", "format", "quant", "layers", "size"):
        table.add_column(column)
    for art in artifacts:
        table.add_row(
            art.path,
            art.format,
            art.quant or "-",
            str(art.layers),
            f"{art.size_bytes / 1e6:,.1f} MB",
        )
    return table


def report_table(report: dict) -> Table:
    """The stacking table: every artifact with perplexity, fidelity, size and speed."""
    from ..report import TABLE_HEADER, quant_factors, table_rows

    ev = report["eval"]
    table = Table(
        title=f"validation on {ev['tokens']} tokens of {ev['source']} (ctx {ev['ctx']})",
        caption="\n".join(quant_factors(report["artifacts"])),
    )
    for index, title in enumerate(TABLE_HEADER):
        table.add_column(title, justify="right" if index >= 2 else "left")
    for row in table_rows(report["artifacts"]):
        table.add_row(*row)
    return table


def accelerator_table(report: dict) -> Table | None:
    """Latency and agreement on each accelerator found, or None when there were none."""
    from ..report import ACCELERATOR_HEADER, accelerator_rows

    rows = accelerator_rows(report["artifacts"])
    if not rows:
        return None
    table = Table(title="accelerators (in addition to the CPU figures)")
    for index, title in enumerate(ACCELERATOR_HEADER):
        table.add_column(title, justify="right" if index >= 4 else "left")
    for row in rows:
        table.add_row(*row)
    return table


def report_renderables(report: dict) -> list:
    """What the CLI prints for a validation report: tables, then where latency came from."""
    from ..report import devices_note

    accelerated = accelerator_table(report)
    return [report_table(report), *([accelerated] if accelerated else []), devices_note(report)]
