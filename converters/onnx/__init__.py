"""ONNX export: optimum (decoder with KV cache) -> onnxruntime fp16 / int8 / int4, verified.

``exporter.ONNXConverter`` is the back-end the registry names; ``build`` makes the graphs
and ``precisions`` names what each precision means.
"""

from .exporter import ONNXConverter

__all__ = ["ONNXConverter"]
