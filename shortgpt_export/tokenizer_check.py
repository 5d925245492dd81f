"""Does an artifact tokenize and chat like the source? One fingerprint per tokenizer.

A fingerprint holds the ids of a fixed set of cases: plain texts with special tokens off
and on (``add_special``), and a two-turn conversation with a system message rendered with
the tokenizer's own chat template and tokenized with special-token parsing. It also names
the end-of-generation ids and the end-of-turn token.

The source's truth is llama.cpp's tokenizer on a GGUF source and the source folder's own
tokenizer otherwise. llama.cpp runs in a subprocess (``python -m
shortgpt_export.tokenizer_check``): a broken vocabulary aborts llama.cpp (for instance
``std::out_of_range`` in ``byte_to_token``), and that must become one error line, not the
end of our process.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

from .errors import ExportError

log = logging.getLogger(__name__)

# Varied text every tokenizer of a model must split the same way. No special-token text:
# llama.cpp parses that only with special=True, transformers always.
PLAIN_TEXTS = (
    "Hello world",
    "The quick brown fox jumps over the lazy dog. It's 2024; isn't it?",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n",
    "Digits 0123456789 and 3.14159, 1,000,000 and -42e-7.",
    "Whitespace    runs\t\ttabs\n\n\nnewlines   and trailing   ",
    "Ελληνικά, русский текст, 日本語のテキスト, 中文文本, العربية, हिन्दी.",
    "Emoji 🙂🚀👍🏽 and symbols ©®™ — “quotes” … ½",
)
CHAT = (
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy? Answer in one word."},
)
GENERATE_TOKENS = 32


def cases(texts=PLAIN_TEXTS) -> list[tuple[str, str, bool]]:
    """(case name, text, add_special) of every plain-text case."""
    out = []
    for index, text in enumerate(texts):
        out.append((f"text{index}", text, False))
        out.append((f"text{index}+special", text, True))
    return out


def render_chat(template: str | None, bos: str | None, eos: str | None) -> str | None:
    """``CHAT`` rendered with a chat template the way transformers renders it."""
    if not template:
        return None
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(
        conversations=[list(CHAT)],
        chat_template=template,
        add_generation_prompt=True,
        bos_token=bos or "",
        eos_token=eos or "",
    )
    return rendered[0]


def _fingerprint(encode, chat_text, eog, end_of_turn, piece) -> dict:
    ids = {name: encode(text, special, False) for name, text, special in cases()}
    ids["chat"] = encode(chat_text, False, True) if chat_text is not None else None
    used = {i for row in ids.values() if row for i in row} | set(eog)
    if end_of_turn is not None:
        used.add(end_of_turn)
    return {
        "ids": ids,
        "chat_text": chat_text,
        "eog": sorted(eog),
        "end_of_turn": end_of_turn,
        "pieces": {str(i): piece(i) for i in sorted(used)},
    }


def hf_fingerprint(tokenizer, generation_config=None) -> dict:
    """The fingerprint of a transformers tokenizer (and the EOG ids of its generation config)."""

    def encode(text, add_special, parse_special):
        # transformers always parses special-token text; plain cases contain none
        return tokenizer(text, add_special_tokens=add_special)["input_ids"]

    chat_text = None
    if getattr(tokenizer, "chat_template", None):
        chat_text = tokenizer.apply_chat_template(
            list(CHAT), tokenize=False, add_generation_prompt=True
        )
    eog = set()
    for value in (getattr(generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if value is not None:
            eog.update(value if isinstance(value, list) else [value])
    return _fingerprint(
        encode, chat_text, eog, tokenizer.eos_token_id, tokenizer.convert_ids_to_tokens
    )


def hf_folder_fingerprint(folder: Path) -> dict:
    """The fingerprint of the tokenizer and generation config saved in ``folder``."""
    from transformers import AutoTokenizer, GenerationConfig

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # transformers raises OSError/ValueError/KeyError here
        raise ExportError(
            f"cannot load the tokenizer of {Path(folder).name}: {type(exc).__name__}: {exc}"[:300],
            hint="the folder needs tokenizer.json or the tokenizer files of its model",
        ) from exc
    try:
        generation = GenerationConfig.from_pretrained(folder)
    except OSError:  # no generation_config.json
        generation = None
    return hf_fingerprint(tokenizer, generation)


def _probe(command: str, path: Path, job: dict) -> dict:
    """In this process: llama.cpp on ``path`` (``tokenize`` needs the vocabulary only)."""
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    vocab_only = command == "tokenize"
    llm = Llama(
        model_path=str(path),
        vocab_only=vocab_only,
        n_ctx=512,
        n_gpu_layers=0,
        logits_all=True,
        verbose=False,
    )
    try:
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        if vocab_only:
            ids = [
                list(llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse))
                for text, add_special, parse in job["texts"]
            ]
            eog = [i for i in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, i)]
            return {"ids": ids, "eog": eog}
        prompt = list(llm.tokenize(job["prompt"].encode("utf-8"), add_bos=False, special=True))
        llm.eval(prompt)
        out: list[int] = []
        for _ in range(job["max_tokens"]):
            out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            if llama_cpp.llama_vocab_is_eog(vocab, out[-1]):
                break
            llm.eval(out[-1:])
        return {"ids": out}
    finally:
        llm.close()


def _run_probe(command: str, path: Path, job: dict, what: str) -> dict:
    cmd = [sys.executable, "-m", "shortgpt_export.tokenizer_check", command, str(path)]
    result = subprocess.run(cmd, input=json.dumps(job), capture_output=True, text=True)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        err = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
        why = (
            f"killed by signal {-result.returncode}"
            if result.returncode < 0
            else f"exit {result.returncode}"
        )
        detail = next((ln for ln in reversed(err) if "what()" in ln or "Error" in ln), None)
        detail = (detail or (err or ["no output"])[-1]).strip()[:200]
        raise ExportError(
            f"llama.cpp failed while {what} {Path(path).name} ({why}): {detail}",
            hint="the GGUF's tokenizer metadata is broken; report this as a bug",
        )
    return json.loads(lines[-1])


def gguf_fingerprint(path: Path) -> dict:
    """llama.cpp's fingerprint of the GGUF at ``path``; llama.cpp runs in a subprocess."""
    from .gguf_tokenizer import read_tokenizer_meta

    meta = read_tokenizer_meta(path)
    chat_text = render_chat(meta.chat_template, meta.token(meta.bos), meta.token(meta.eos))
    job = [(text, special, False) for _, text, special in cases()]
    if chat_text is not None:
        job.append((chat_text, False, True))
    result = _run_probe("tokenize", path, {"texts": job}, "tokenizing with")
    answers = iter(result["ids"])

    def encode(text, add_special, parse_special):
        return next(answers)

    end_of_turn = meta.eot if meta.token(meta.eot) is not None else meta.eos
    return _fingerprint(encode, chat_text, result["eog"], end_of_turn, meta.token)


def gguf_chat_reply(path: Path, max_tokens: int = GENERATE_TOKENS) -> list[str]:
    """The greedy reply of the GGUF at ``path`` to ``CHAT`` (its own template), as tokens,
    up to and including the end-of-generation token llama.cpp stops at."""
    from .gguf_tokenizer import read_tokenizer_meta

    meta = read_tokenizer_meta(path)
    prompt = render_chat(meta.chat_template, meta.token(meta.bos), meta.token(meta.eos))
    if prompt is None:
        raise ExportError(f"{Path(path).name} has no chat template (tokenizer.chat_template)")
    job = {"prompt": prompt, "max_tokens": max_tokens}
    result = _run_probe("generate", path, job, "generating with")
    return [meta.token(i) for i in result["ids"]]


def source_fingerprint(source) -> dict | None:
    """The source's truth: llama.cpp on a GGUF source, the source folder's tokenizer else
    (None when the folder carries no tokenizer: then there is nothing to compare with)."""
    if source.kind == "gguf":
        return gguf_fingerprint(source.path)
    if not any(source.path.glob("tokenizer*")):
        log.warning("%s has no tokenizer files; exported tokenizers are not checked", source.ref)
        return None
    return hf_folder_fingerprint(source.path)


def artifact_fingerprint(path: Path) -> dict:
    """The fingerprint of an artifact: a .gguf file, or a folder with tokenizer files."""
    path = Path(path)
    if path.suffix.lower() == ".gguf":
        return gguf_fingerprint(path)
    return hf_folder_fingerprint(path)


def _describe(ids, pieces) -> str:
    return "[" + ", ".join(f"{i} {pieces.get(str(i))!r}" for i in ids) + "]"


def mismatch(truth: dict, candidate: dict) -> str | None:
    """Why ``candidate`` does not tokenize, chat and stop like ``truth``, or None."""
    for name, expected in truth["ids"].items():
        got = candidate["ids"].get(name)
        if got == expected:
            continue
        if expected is None or got is None:
            side = "has no chat template" if got is None else "has a chat template the source lacks"
            return f"{name}: the artifact {side}"
        at = next(
            (i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b),
            min(len(got), len(expected)),
        )
        where = "special tokens on" if name.endswith("+special") else "special tokens off"
        if name == "chat":
            where = "rendered chat"
        return (
            f"{name} ({where}) differs from token {at}: "
            f"{_describe(got[at : at + 3], candidate['pieces'])} vs the source's "
            f"{_describe(expected[at : at + 3], truth['pieces'])} "
            f"({len(got)} vs {len(expected)} tokens)"
        )
    turn = truth["pieces"].get(str(truth["end_of_turn"]))
    if turn is not None:
        stops = {candidate["pieces"].get(str(i)) for i in candidate["eog"]}
        if turn not in stops:
            names = sorted(s for s in stops if s)
            return (
                f"generation does not stop at the source's end-of-turn token {turn!r} "
                f"(it stops at {names})"
            )
    return None


def check_artifact(truth: dict | None, path: Path, candidate: dict | None = None) -> dict | None:
    """Raise ExportError when the artifact at ``path`` does not tokenize like the source
    (``truth``; None skips the check)."""
    if truth is None:
        return None
    candidate = candidate if candidate is not None else artifact_fingerprint(path)
    why = mismatch(truth, candidate)
    if why:
        raise ExportError(
            f"{Path(path).name} does not tokenize like the source: {why}",
            hint="report this as a bug; pass --no-verify to keep the files anyway",
        )
    log.info("%s tokenizes and renders chat like the source", Path(path).name)
    return candidate


def hf_chat_reply(folder: Path, max_tokens: int = GENERATE_TOKENS) -> list[str]:
    """The greedy reply of the Hugging Face folder to ``CHAT`` in transformers, as tokens,
    stopping at its generation config's end-of-generation ids."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template(list(CHAT), add_generation_prompt=True, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False)
    return tokenizer.convert_ids_to_tokens(out[0, ids.shape[1] :].tolist())


def onnx_chat_reply(folder: Path, max_tokens: int = GENERATE_TOKENS) -> list[str]:
    """The greedy reply of an ONNX folder to ``CHAT`` in onnxruntime (with its KV cache),
    stopping at the folder's end-of-generation ids."""
    import numpy as np

    from .errors import ShortGPTError
    from .onnx_runtime import OnnxDecoder

    fingerprint = hf_folder_fingerprint(folder)
    if fingerprint["chat_text"] is None:
        raise ShortGPTError(f"{Path(folder).name} has no chat template")
    stops = set(fingerprint["eog"])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = fingerprint["ids"]["chat"]
    decoder = OnnxDecoder(Path(folder))
    logits, past = decoder.forward(np.array([prompt]))
    out: list[int] = []
    for _ in range(max_tokens):
        out.append(int(logits[0, -1].argmax()))
        if out[-1] in stops:
            break
        logits, past = decoder.forward(np.array([out[-1:]]), past, len(prompt) + len(out) - 1)
    return tokenizer.convert_ids_to_tokens(out)


def artifact_chat_reply(path: Path, max_tokens: int = GENERATE_TOKENS) -> list[str]:
    """The greedy reply to ``CHAT`` of a .gguf file (llama.cpp, in a subprocess), an ONNX
    folder (onnxruntime) or a Hugging Face folder (transformers)."""
    path = Path(path)
    if path.suffix.lower() == ".gguf":
        return gguf_chat_reply(path, max_tokens)
    if (path / "model.onnx").is_file():
        return onnx_chat_reply(path, max_tokens)
    return hf_chat_reply(path, max_tokens)


def check_reply(truth: dict, reply: list[str], name: str) -> None:
    """Raise unless ``reply`` ends at the source's end-of-turn token (within the budget)."""
    turn = truth["pieces"].get(str(truth["end_of_turn"]))
    if not reply or reply[-1] != turn:
        last = reply[-1] if reply else None
        raise ExportError(
            f"{name}: the greedy chat reply does not stop at the source's end-of-turn token "
            f"{turn!r} within {GENERATE_TOKENS} tokens (it ends with {last!r}: "
            f"{''.join(reply)[:80]!r})",
            hint="the exported end-of-generation tokens or chat template differ from the source's",
        )


def chat_stop_record(truth: dict, path: Path) -> dict | None:
    """Greedy-generate the reply to ``CHAT`` from the artifact at ``path`` and say whether it
    ends at the source's end-of-turn token.

    Meant for the unpruned model exported the same way as the pruned one: if that does not
    stop, the exported end-of-generation tokens or template are wrong, whatever pruning
    did. It reports rather than raises, because a model that rambles (a tiny random one,
    say) is not a broken export; the warning names the token. None when the source has no
    chat template or no end-of-turn token: there is no conversation to check.
    """
    if truth["chat_text"] is None or truth["end_of_turn"] is None:
        return None
    reply = artifact_chat_reply(path)
    turn = truth["pieces"].get(str(truth["end_of_turn"]))
    try:
        check_reply(truth, reply, Path(path).name)
        detail = None
    except ExportError as err:
        detail = str(err)
        log.warning("%s", detail)
    return {
        "end_of_turn": turn,
        "stops": detail is None,
        "tokens": len(reply),
        "reply": "".join(reply),
        "detail": detail,
    }


def main(argv: list[str]) -> int:
    """``python -m shortgpt_export.tokenizer_check tokenize|generate PATH`` < job JSON."""
    command, path = argv[0], Path(argv[1])
    print(json.dumps(_probe(command, path, json.loads(sys.stdin.read()))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
