"""Check a written GGUF against the torch model it came from, through llama.cpp."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

from shortgpt_export.errors import ExportError
from shortgpt_export.fidelity import Fidelity, compare_logprobs

log = logging.getLogger(__name__)

# Varied text the GGUF tokenizer must split exactly like the Hugging Face one.
TOKENIZER_SAMPLES = (
    "The quick brown fox jumps over the lazy dog. It's 2024; isn't it?",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n",
    "Digits 0123456789 and 3.14159, 1,000,000 and -42e-7.",
    "Whitespace    runs\t\ttabs\n\n\nnewlines   and trailing   ",
    "Ελληνικά, русский текст, 日本語のテキスト, 中文文本, العربية, हिन्दी.",
    "Emoji 🙂🚀👍🏽 and symbols ©®™ — “quotes” … ½",
)
# (top-1 agreement at least, mean KL at most) against the torch model. Quantized files
# only get a KL bound: a broken file (wrong layer order, wrong rope layout) is off by
# several nats, while quantization noise on near-tied tokens can flip top-1 freely.
EXACT_BOUNDS = (0.99, 0.01)
QUANTIZED_BOUNDS = (0.0, 1.0)


def open_llama(path: Path, n_ctx: int, threads: int | None = None, gpu: bool = False):
    """A llama-cpp-python model with logits for every position; the caller closes it.

    ``gpu=True`` offloads every layer and the KV cache to the build's GPU back-end (Metal,
    CUDA). Otherwise nothing is offloaded, not even large-batch ops, so CPU figures stay
    CPU figures on a GPU build too.
    """
    from llama_cpp import Llama

    return Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        logits_all=True,
        verbose=False,
        n_threads=threads,
        n_batch=n_ctx,
        n_gpu_layers=-1 if gpu else 0,
        offload_kqv=gpu,
        op_offload=gpu,
    )


@contextmanager
def llama_model(path: Path, n_ctx: int, threads: int | None = None):
    """:func:`open_llama` as a context manager."""
    llm = open_llama(path, n_ctx, threads)
    try:
        yield llm
    finally:
        llm.close()


def llama_logprobs(llm, windows):
    """[n_windows * len, vocab] next-token log-probabilities from llama.cpp."""
    import numpy as np
    import torch

    rows = []
    for window in windows:
        llm.reset()
        tokens = window.tolist()
        llm.eval(tokens)
        logits = torch.from_numpy(np.array(llm.scores[: len(tokens)], dtype=np.float64))
        rows.append(torch.log_softmax(logits, dim=-1))
    return torch.cat(rows)


def check_tokenizer(llm, tokenizer, path: Path) -> None:
    """Raise if llama.cpp and the Hugging Face tokenizer split any sample differently."""
    for text in TOKENIZER_SAMPLES:
        ours = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        theirs = tokenizer(text, add_special_tokens=False)["input_ids"]
        ours = list(ours)
        if ours != theirs:
            at = next(
                (i for i, (x, y) in enumerate(zip(ours, theirs, strict=False)) if x != y),
                min(len(ours), len(theirs)),
            )
            raise ExportError(
                f"{path.name}: llama.cpp and Hugging Face tokenize {text[:30]!r}... differently "
                f"from token {at} on: {ours[at : at + 4]} vs {theirs[at : at + 4]} "
                f"({len(ours)} vs {len(theirs)} tokens)",
                hint="the GGUF tokenizer metadata does not match the model's tokenizer",
            )


def verify_gguf(path: Path, reference, tokenizer, windows, *, exact: bool) -> Fidelity:
    """Compare llama.cpp on ``path`` with ``reference`` log-probs; raise on a mismatch."""
    with llama_model(path, n_ctx=int(windows.shape[1])) as llm:
        check_tokenizer(llm, tokenizer, path)
        fidelity = compare_logprobs(reference, llama_logprobs(llm, windows))
    min_top1, max_kl = EXACT_BOUNDS if exact else QUANTIZED_BOUNDS
    log.info("%s: KL %.5f, top-1 %.3f", path.name, fidelity.kl_divergence, fidelity.top1_agreement)
    if fidelity.decisive_top1_agreement < min_top1 or fidelity.kl_divergence > max_kl:
        raise ExportError(
            f"{path.name} disagrees with the torch model: top-1 agreement "
            f"{fidelity.decisive_top1_agreement:.3f} away from near-ties (need >= {min_top1}), "
            f"{fidelity.top1_agreement:.3f} overall, mean KL "
            f"{fidelity.kl_divergence:.4f} (need <= {max_kl}) over {fidelity.tokens} tokens",
            hint="report this as a bug; pass --no-verify to keep the file anyway",
        )
    return fidelity
