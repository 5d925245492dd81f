"""One evaluator interface, three back-ends: torch, llama.cpp (GGUF), onnxruntime (ONNX).

Every back-end takes the same token ids and returns next-token log-probabilities, and
measures latency the same way: prompt processing, then greedy generation with the cache.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from pathlib import Path

import numpy as np

from ..errors import ModelNotFoundError
from ..torch_threads import torch_threads
from .devices import ORT_PROVIDERS, require
from .qa import FALLBACK_PROMPT


class PeakRss:
    """Samples this process's RSS in a thread; ``peak`` is the highest value seen."""

    def __init__(self, interval: float = 0.01):
        import psutil

        self._process = psutil.Process()
        self.interval = interval
        self.peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


class Evaluator:
    """Base class: ``logprobs``, ``token_ids``, ``_prompt``/``_step`` for latency and
    generation, and ``chat_ids``/``detokenize``/``eog_ids`` for chat (the QA check)."""

    backend = "?"

    def __init__(self, path: Path, threads: int, device: str = "cpu"):
        self.path = Path(path)
        self.threads = threads
        self.device = device

    def logprobs(self, window: np.ndarray):
        """[len, vocab] float64 log-probabilities of the token after each position."""
        raise NotImplementedError

    def token_ids(self, text: str) -> list[int] | None:
        """How this artifact tokenizes ``text`` (None when it carries no tokenizer)."""
        return None

    def latency(self, prompt: list[int], new_tokens: int, reps: int) -> dict:
        """Median prompt tok/s, generation tok/s and time to first token after a warm-up."""
        prompt_rates, gen_rates, ttfts = [], [], []
        for rep in range(reps + 1):
            began = time.perf_counter()
            token = self._prompt(prompt)
            first = time.perf_counter()
            for _ in range(new_tokens - 1):
                token = self._step(token)
            done = time.perf_counter()
            if rep:  # the first pass warms caches and allocators up
                prompt_rates.append(len(prompt) / (first - began))
                gen_rates.append((new_tokens - 1) / (done - first))
                ttfts.append(first - began)
        return {
            "prompt_tok_s": statistics.median(prompt_rates),
            "gen_tok_s": statistics.median(gen_rates),
            "ttft_s": statistics.median(ttfts),
        }

    def chat_ids(self, message: str) -> list[int]:
        """``message`` as one user turn through the artifact's own chat template, ready
        for the assistant's reply (a plain question/answer prompt when it has none)."""
        raise NotImplementedError

    def detokenize(self, ids: list[int]) -> str:
        raise NotImplementedError

    eog_ids: frozenset[int] = frozenset()  # tokens that end a reply

    def generate(self, prompt: list[int], max_new_tokens: int, stop=None) -> list[int]:
        """Greedy continuation of ``prompt``: at most ``max_new_tokens`` tokens, ending
        before an end-of-generation token or once ``stop(text so far)`` is true."""
        ids: list[int] = []
        token = self._prompt(prompt)
        while token not in self.eog_ids and len(ids) < max_new_tokens:
            ids.append(token)
            if len(ids) == max_new_tokens or (stop and stop(self.detokenize(ids))):
                break
            token = self._step(token)
        return ids

    def generate_text(self, prompt: list[int], max_new_tokens: int, stop=None) -> str:
        return self.detokenize(self.generate(prompt, max_new_tokens, stop))

    def _prompt(self, prompt: list[int]) -> int:
        raise NotImplementedError

    def _step(self, token: int) -> int:
        raise NotImplementedError

    def close(self) -> None:
        pass


def hf_chat_ids(tokenizer, message: str) -> list[int]:
    """``chat_ids`` for a Hugging Face tokenizer: its chat template, else the fallback."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(FALLBACK_PROMPT.format(question=message))["input_ids"]


def hf_eog_ids(tokenizer, generation_eos) -> frozenset[int]:
    """The tokenizer's end-of-sequence token and the generation config's ones."""
    ids = {getattr(tokenizer, "eos_token_id", None)}
    ids.update(generation_eos if isinstance(generation_eos, list) else [generation_eos])
    return frozenset(int(i) for i in ids if i is not None)


class HFTokenizerEvaluator(Evaluator):
    """An evaluator whose artifact carries a transformers tokenizer (``self.tokenizer``)."""

    def token_ids(self, text):
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def chat_ids(self, message):
        return hf_chat_ids(self.tokenizer, message)

    def detokenize(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def torch_quant_label(dtype) -> str:
    """The report's quant label of a torch row: ``torch fp32``, ``torch bf16``, ..."""
    name = str(dtype).removeprefix("torch.")
    short = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}
    return f"torch {short.get(name, name)}"


class TorchEvaluator(HFTokenizerEvaluator):
    backend = "torch"

    def __init__(self, path: Path, threads: int, model=None, tokenizer=None, device="cpu"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if model is None:
            require(device, "hf")
        super().__init__(path, threads, device)
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
        self.model = model.eval()
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(path)
        self.version = f"torch {torch.__version__}"
        self._cache = None
        self._length = 0
        config = getattr(self.model, "generation_config", None)
        self.eog_ids = hf_eog_ids(self.tokenizer, getattr(config, "eos_token_id", None))

    def _threads(self):
        return torch_threads(self.threads)

    def logprobs(self, window):
        from ..fidelity import torch_logprobs

        with self._threads():
            return torch_logprobs(self.model, [window])

    def _run(self, ids: list[int]) -> int:
        import torch

        with self._threads(), torch.inference_mode():
            out = self.model(
                input_ids=torch.tensor([ids], device=self.device),
                past_key_values=self._cache,
                use_cache=True,
            )
        self._cache = out.past_key_values
        return int(out.logits[0, -1].argmax())

    def _prompt(self, prompt):
        self._cache = None
        return self._run(prompt)

    def _step(self, token):
        return self._run([token])


class LlamaCppEvaluator(Evaluator):
    backend = "llama.cpp"

    def __init__(self, path: Path, threads: int, n_ctx: int = 2048, device: str = "cpu"):
        import llama_cpp

        from ..llama_runtime import open_llama

        require(device, "gguf")
        super().__init__(path, threads, device)
        self.llm = open_llama(path, n_ctx, threads, gpu=device != "cpu")
        self.version = f"llama.cpp (llama-cpp-python {llama_cpp.__version__})"
        vocab = self.llm._model.vocab
        self.eog_ids = frozenset(
            t for t in range(self.llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)
        )

    def logprobs(self, window):
        from ..llama_runtime import llama_logprobs

        return llama_logprobs(self.llm, [np.asarray(window)])

    def token_ids(self, text):
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def chat_ids(self, message):
        """Through the GGUF's ``tokenizer.chat_template``, rendered as llama-cpp-python's
        chat completion renders it."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            text = FALLBACK_PROMPT.format(question=message).encode("utf-8")
            return list(self.llm.tokenize(text, add_bos=True, special=False))

        def text_of(token: int) -> str:
            return self.llm._model.token_get_text(token) if token != -1 else ""

        eos, bos = text_of(self.llm.token_eos()), text_of(self.llm.token_bos())
        formatter = Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos)
        prompt = formatter(messages=[{"role": "user", "content": message}]).prompt
        return list(self.llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True))

    def detokenize(self, ids):
        return self.llm.detokenize(ids).decode("utf-8", errors="replace")

    def _prompt(self, prompt):
        self.llm.reset()
        self.llm.eval(prompt)
        return int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))

    def _step(self, token):
        self.llm.eval([token])
        return int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))

    def close(self):
        self.llm.close()


class OrtEvaluator(HFTokenizerEvaluator):
    backend = "onnxruntime"

    def __init__(self, path: Path, threads: int, device: str = "cpu"):
        import onnxruntime
        from transformers import AutoTokenizer

        from ..onnx_runtime import OnnxDecoder

        require(device, "onnx")
        super().__init__(path, threads, device)
        provider = "CPUExecutionProvider" if device == "cpu" else ORT_PROVIDERS[device]
        self.decoder = OnnxDecoder(path, threads=threads, provider=provider)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.version = f"onnxruntime {onnxruntime.__version__}"
        self._past, self._length = None, 0
        config = Path(path) / "generation_config.json"
        eos = json.loads(config.read_text())["eos_token_id"] if config.is_file() else None
        self.eog_ids = hf_eog_ids(self.tokenizer, eos)

    def logprobs(self, window):
        return self.decoder.logprobs(np.asarray(window).reshape(1, -1))

    def _prompt(self, prompt):
        logits, self._past = self.decoder.forward(np.array([prompt]))
        self._length = len(prompt)
        return int(logits[0, -1].argmax())

    def _step(self, token):
        logits, self._past = self.decoder.forward(np.array([[token]]), self._past, self._length)
        self._length += 1
        return int(logits[0, -1].argmax())


def artifact_kind(path: Path) -> str:
    """``gguf``, ``onnx`` or ``hf`` for an artifact path; raises if it is none of them."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return "gguf"
    if path.is_dir() and (path / "model.onnx").is_file():
        return "onnx"
    if path.is_dir() and (path / "config.json").is_file():
        return "hf"
    raise ModelNotFoundError(
        f"artifact {path} is not a .gguf file, an ONNX folder or a Hugging Face folder",
        hint="pass files and folders written by shortgpt-export",
    )


def open_evaluator(path: Path, threads: int, n_ctx: int = 2048, device: str = "cpu") -> Evaluator:
    """The evaluator for the artifact at ``path`` on ``device`` (cpu or an accelerator)."""
    kind = artifact_kind(path)
    if kind == "gguf":
        return LlamaCppEvaluator(path, threads, n_ctx=n_ctx, device=device)
    if kind == "onnx":
        return OrtEvaluator(path, threads, device=device)
    return TorchEvaluator(path, threads, device=device)
