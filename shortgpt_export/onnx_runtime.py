"""Run an exported ONNX decoder with a plain onnxruntime session, with or without cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shortgpt_export.errors import DeviceUnavailableError


class OnnxDecoder:
    """An ``onnxruntime.InferenceSession`` over ``model.onnx`` with its KV-cache inputs."""

    def __init__(
        self, folder: Path, threads: int | None = None, provider: str = "CPUExecutionProvider"
    ):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        providers = list(dict.fromkeys([provider, "CPUExecutionProvider"]))
        self.session = ort.InferenceSession(str(Path(folder) / "model.onnx"), options, providers)
        # onnxruntime falls back to the CPU silently when a provider cannot start.
        if self.session.get_providers()[0] != provider:
            raise DeviceUnavailableError(
                f"onnxruntime could not start {provider} for {folder}; it fell back to "
                f"{self.session.get_providers()[0]}",
                hint="check the provider's drivers, or use --devices cpu",
            )
        self.past = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values")]
        self.input_names = {i.name for i in self.session.get_inputs()}

    def _empty_past(self, batch: int) -> dict:
        feeds = {}
        for spec in self.past:
            heads, dim = spec.shape[1], spec.shape[3]
            dtype = np.float16 if "float16" in spec.type else np.float32
            feeds[spec.name] = np.zeros((batch, heads, 0, dim), dtype=dtype)
        return feeds

    def forward(self, ids: np.ndarray, past: dict | None = None, past_len: int = 0):
        """Logits [batch, seq, vocab] and the new cache for ``ids`` after ``past_len`` tokens."""
        batch, seq = ids.shape
        feeds = {"input_ids": ids.astype(np.int64)}
        if "attention_mask" in self.input_names:
            feeds["attention_mask"] = np.ones((batch, past_len + seq), dtype=np.int64)
        if "position_ids" in self.input_names:
            feeds["position_ids"] = np.arange(past_len, past_len + seq, dtype=np.int64)[
                None
            ].repeat(batch, 0)
        feeds.update(past if past is not None else self._empty_past(batch))
        outputs = self.session.run(None, feeds)
        names = [o.name for o in self.session.get_outputs()]
        logits = outputs[names.index("logits")]
        present = {
            name.replace("present", "past_key_values"): value
            for name, value in zip(names, outputs, strict=True)
            if name.startswith("present")
        }
        return logits, present

    def logprobs(self, windows) -> np.ndarray:
        """[n_windows * len, vocab] next-token log-probabilities, one window at a time."""
        import torch

        rows = []
        for window in windows:
            logits, _ = self.forward(np.asarray(window).reshape(1, -1))
            rows.append(torch.log_softmax(torch.from_numpy(logits[0]).double(), dim=-1))
        return torch.cat(rows)

    def greedy(self, prompt: list[int], new_tokens: int, *, use_cache: bool) -> list[int]:
        """Greedy continuation, feeding the cache back or recomputing the whole prefix."""
        tokens = list(prompt)
        past, past_len = None, 0
        step_ids = tokens
        for _ in range(new_tokens):
            logits, present = self.forward(np.array([step_ids]), past, past_len)
            tokens.append(int(logits[0, -1].argmax()))
            if use_cache:
                past, past_len, step_ids = present, len(tokens) - 1, [tokens[-1]]
            else:
                step_ids = tokens
        return tokens[len(prompt) :]
