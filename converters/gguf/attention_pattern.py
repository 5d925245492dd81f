"""Sliding-window / global attention patterns that llama.cpp derives from the layer index.

Gemma 2 and 3 mix sliding-window and global attention layers. Hugging Face lists the
kind of every layer (``layer_types``), so a pruned config is right once that list is
sliced. llama.cpp instead derives the kind from the layer index (Gemma 2: every second
layer global, Gemma 3: every sixth) unless the GGUF carries a per-layer
``{arch}.attention.sliding_window_pattern`` array it reads for that arch. Removing a layer
shifts the later ones, and the GGUF would silently compute something else. So:

* where llama.cpp reads the array (Gemma 2 and 3, tested with llama-cpp-python 0.3.36),
  the pruned pattern is written into the GGUF;
* for a family with an index-derived pattern where it does not, a plan that moves any
  kept layer onto an index of the other kind is refused, naming the lowest-scored plan
  of the same size that keeps the pattern.

Families whose llama.cpp graph has no sliding window at all (Llama, Mistral, Mixtral,
Qwen) run the GGUF over the full context: a config with a window gets a warning.
"""

from __future__ import annotations

import logging

from shortgpt_export.errors import ExportError

log = logging.getLogger(__name__)

SLIDING = "sliding_attention"


def index_pattern(period: int, num_layers: int) -> list[bool]:
    """llama.cpp's derived pattern: True for a sliding-window layer."""
    return [i % period < period - 1 for i in range(num_layers)]


def pattern_key(arch: str) -> str:
    return f"{arch}.attention.sliding_window_pattern"


def source_pattern(config: dict, period: int) -> list[bool]:
    """The original model's per-layer kinds: ``layer_types`` if listed, else by index."""
    n = int(config["num_hidden_layers"])
    types = config.get("layer_types")
    if isinstance(types, list) and len(types) == n:
        return [t == SLIDING for t in types]
    return index_pattern(period, n)


def keeps_pattern(pattern: list[bool], keep: list[int], period: int) -> bool:
    """Whether every kept layer lands on an index llama.cpp gives the same kind."""
    return [pattern[i] for i in keep] == index_pattern(period, len(keep))


def preserving_removal(
    pattern: list[bool], period: int, remove: int, scores: list[float] | None
) -> list[int] | None:
    """The ``remove`` layers of least total score (by index without scores) whose removal
    keeps the pattern, or None if there is none. Dynamic programme over (layer, kept)."""
    n = len(pattern)
    kept_count = n - remove
    target = index_pattern(period, kept_count)
    cost = scores or [float(n - i) for i in range(n)]  # no scores: prefer late layers
    inf = float("inf")
    # best[j]: least removed-score so far with j layers kept; choice rebuilt from back
    best = [0.0] + [inf] * kept_count
    back: list[list[bool]] = []  # back[i][j]: layer i kept to reach j
    for i in range(n):
        new = [inf] * (kept_count + 1)
        took = [False] * (kept_count + 1)
        for j in range(kept_count + 1):
            if best[j] == inf:
                continue
            if best[j] + cost[i] < new[j]:  # remove layer i
                new[j], took[j] = best[j] + cost[i], False
            if j < kept_count and pattern[i] == target[j] and best[j] < new[j + 1]:
                new[j + 1], took[j + 1] = best[j], True  # keep layer i as new index j
        best = new
        back.append(took)
    if best[kept_count] == inf:
        return None
    removed, j = [], kept_count
    for i in range(n - 1, -1, -1):
        if back[i][j]:
            j -= 1
        else:
            removed.append(i)
    return sorted(removed)


def check_plan(spec, config: dict, plan) -> list[bool] | None:
    """For a family whose GGUF attention pattern comes from the layer index: the pruned
    per-layer pattern to write into the GGUF (where llama.cpp reads one), None when
    nothing needs writing; raises when the GGUF cannot express the plan."""
    period = spec.gguf_swa_period
    if not period:
        return None
    pattern = source_pattern(config, period)
    kept = [pattern[i] for i in plan.keep]
    if spec.gguf_swa_per_layer:
        return kept
    if keeps_pattern(pattern, plan.keep, period):
        return None
    alternative = preserving_removal(pattern, period, len(plan.remove), plan.scores)
    hint = (
        f"use --layers {','.join(map(str, alternative))} (the {len(plan.remove)} "
        + ("lowest-scored " if plan.scores else "")
        + "layers whose removal keeps the pattern), or export --to hf"
        if alternative
        else "remove fewer layers, or export --to hf"
    )
    raise ExportError(
        f"removing layers {plan.remove} moves {spec.display_name} layers onto indices of the "
        f"other attention kind: llama.cpp derives the kind from the index (one global "
        f"layer in every {period}), so the GGUF would compute something else",
        hint=hint,
    )


def add_pattern(path, arch: str, pattern: list[bool]) -> None:
    """Rewrite the GGUF at ``path`` with ``pattern`` as its per-layer sliding-window array."""
    import os

    from gguf import GGUFValueType

    from shortgpt_export.gguf_file import open_gguf

    from .prune_gguf import copied_fields, write_gguf

    reader = open_gguf(path)
    tmp = path.with_name(path.name + ".pattern")
    fields = copied_fields(reader, drop=(pattern_key(arch),))
    fields.append((pattern_key(arch), [bool(x) for x in pattern], GGUFValueType.ARRAY, None))
    write_gguf(reader, tmp, arch, fields, [(t.name, t) for t in reader.tensors])
    del reader
    os.replace(tmp, path)


def warn_full_attention(spec, config: dict) -> int | None:
    """Log that the GGUF attends to the full context when the config has a sliding window
    llama.cpp does not run for ``spec``'s family (its converter does not write one: Llama,
    Mistral, Mixtral, Qwen); returns that window, else None."""
    window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
    types = config.get("layer_types")
    if spec.gguf_sliding_window or not window or (isinstance(types, list) and SLIDING not in types):
        return None
    if window >= config.get("max_position_embeddings", window + 1):
        return None
    log.warning(
        "llama.cpp runs %s (%s) without its %d-token sliding window: the GGUF attends to the "
        "full context, so contexts longer than %d tokens differ from the torch model",
        spec.display_name,
        spec.model_type,
        window,
        window,
    )
    return window
