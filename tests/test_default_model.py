"""The real default model (SmolLM2-135M-Instruct GGUF) on real text (WikiText-2 test)."""

import math

import pytest
from helpers import torch_perplexity
from tiny_models import WIKITEXT

from shortgpt_export.calibration import tokenize_windows
from shortgpt_export.evaluation import eval_windows
from shortgpt_export.planning import make_plan
from shortgpt_export.pruning import pruned_view
from shortgpt_export.scoring import score_model
from shortgpt_export.source import load_model, resolve_source


@pytest.fixture(scope="module")
def smollm(default_gguf):
    source = resolve_source(None)
    assert source.path == default_gguf and source.kind == "gguf"
    return load_model(source, device="cpu")


@pytest.fixture(scope="module")
def wikitext():
    if not WIKITEXT.is_file():
        pytest.fail(f"{WIKITEXT} is missing: tests expect ../shared/data beside the checkout")
    return WIKITEXT.read_text(encoding="utf-8")


def test_bi_pruning_beats_removing_the_last_layers(smollm, wikitext):
    # calibration on the split's tail, evaluation on its head: never on the same text
    head, tail = wikitext[:40_000], wikitext[-40_000:]
    calib = tokenize_windows(
        smollm.tokenizer, [tail], source=str(WIKITEXT), seq_len=256, max_tokens=2048, seed=0
    )
    scores = score_model(smollm, calib, metric="bi")
    assert scores.num_layers == 30 and len(scores.scores) == 30
    assert all(0.0 < s < 1.5 and math.isfinite(s) for s in scores.scores)
    assert scores.calibration["tokens"] == 2048
    # the first block rewrites the embedding almost entirely
    assert scores.ranking()[-1] == 0

    windows = eval_windows(smollm.tokenizer, head, ctx=512, max_tokens=4 * 512)
    assert windows.shape == (4, 512)
    base = torch_perplexity(smollm.model, windows)
    by_bi = make_plan(30, scores.scores, remove=4)
    last_four = make_plan(30, scores.scores, layers=[25, 26, 27, 28])
    with pruned_view(smollm.model, smollm.source.spec, by_bi.keep) as model:
        ppl_bi = torch_perplexity(model, windows)
    with pruned_view(smollm.model, smollm.source.spec, last_four.keep) as model:
        ppl_last = torch_perplexity(model, windows)
    print(
        f"\nperplexity: base {base:.1f}, BI-pruned {by_bi.remove} {ppl_bi:.1f}, "
        f"last four removed {ppl_last:.1f}"
    )
    # measured: base 30.2, BI-pruned [12, 13, 14, 17] 56.4, the last four removed 18,640
    assert base < ppl_bi < ppl_last / 10
