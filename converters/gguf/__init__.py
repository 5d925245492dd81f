"""GGUF export: prune (GGUF source) or convert (safetensors source), quantize, verify.

``exporter.GGUFConverter`` is the back-end the registry names; the steps live in modules
named for them: ``prune_gguf``, ``hf_to_gguf``, ``llama_cpp_converter``, ``quantize``,
``attention_pattern``, ``metadata``, ``tokenizer``, ``modelfile`` and ``verify``.
"""

from .exporter import GGUFConverter

__all__ = ["GGUFConverter"]
