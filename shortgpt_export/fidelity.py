"""Agreement of two models' next-token distributions on the same token windows."""

from __future__ import annotations

from dataclasses import dataclass

NEAR_TIE_NATS = 0.01  # top-2 log-prob gap below which rounding alone may swap the winner
# Mean KL bound for quantized exports of every format: a broken file (wrong layer order,
# wrong rope layout, a broken graph) is off by several nats, quantization noise far less.
QUANTIZED_MAX_KL = 1.0


@dataclass
class Fidelity:
    """Mean KL(reference || candidate), top-1 agreement and max |log-prob difference|.

    ``decisive_top1_agreement`` counts only positions where the reference's top two
    tokens are more than ``NEAR_TIE_NATS`` apart: float rounding cannot flip those.
    """

    kl_divergence: float
    top1_agreement: float
    decisive_top1_agreement: float
    max_abs_logprob_diff: float
    tokens: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def compare_logprobs(reference, candidate) -> Fidelity:
    """Compare [tokens, vocab] log-probability arrays (numpy or torch) row by row."""
    import torch

    ref = torch.as_tensor(reference, dtype=torch.float64)
    cand = torch.as_tensor(candidate, dtype=torch.float64)
    if ref.shape != cand.shape:
        raise ValueError(f"log-prob shapes differ: {tuple(ref.shape)} vs {tuple(cand.shape)}")
    kl = (ref.exp() * (ref - cand)).sum(-1)
    agree = (ref.argmax(-1) == cand.argmax(-1)).double()
    top2 = ref.topk(2, dim=-1).values
    decisive = (top2[:, 0] - top2[:, 1]) > NEAR_TIE_NATS
    return Fidelity(
        kl_divergence=float(kl.mean()),
        top1_agreement=float(agree.mean()),
        decisive_top1_agreement=float(agree[decisive].mean()) if decisive.any() else 1.0,
        max_abs_logprob_diff=float((ref - cand).abs().max()),
        tokens=int(ref.shape[0]),
    )


def torch_logprobs(model, windows):
    """[n_windows * len, vocab] next-token log-probabilities of a torch causal LM."""
    import torch

    device = next(model.parameters()).device
    rows = []
    with torch.inference_mode():
        for window in windows:
            ids = torch.as_tensor(window).view(1, -1).to(device)
            logits = model(input_ids=ids, use_cache=False).logits[0].cpu()
            rows.append(torch.log_softmax(logits.double(), dim=-1))
    return torch.cat(rows)


VERIFY_WINDOWS, VERIFY_LEN = 4, 128


def verification_windows(tokenizer, windows: int = VERIFY_WINDOWS, length: int = VERIFY_LEN):
    """Token windows of the built-in text, for checking an export against torch."""
    from .calibration import load_calibration

    return load_calibration(tokenizer, None, seq_len=length, max_tokens=windows * length).input_ids


def pruned_reference(loaded, plan, windows):
    """Log-probabilities of the pruned torch model: a view of ``loaded`` (no copy, healed
    by the pipeline's ``pruning.healed``), or, for a model scored layer by layer
    (``offload.StreamedModel``), computed one layer at a time with the plan's patches."""
    from .pruning import pruned_view

    if loaded.model is None:
        from .offload import stream_logprobs

        patches = plan.patch_weights(loaded.source.spec)
        return stream_logprobs(loaded, plan.keep, windows, patches)
    with pruned_view(loaded.model, loaded.source.spec, plan.keep) as model:
        return torch_logprobs(model, windows)
