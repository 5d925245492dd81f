"""Which accelerators each back-end can use on this machine, beyond the CPU.

CPU figures are always measured. On Apple Silicon llama.cpp offloads to Metal and
onnxruntime can use the CoreML execution provider; on NVIDIA machines both use CUDA.
Each table maps a device name (as the report shows it) to what the back-end calls it.
"""

from __future__ import annotations

from ..errors import DeviceUnavailableError

# ggml back-end names as ``llama_print_system_info`` lists them.
LLAMA_CPP_BACKENDS = {
    "metal": "Metal",
    "cuda": "CUDA",
    "rocm": "ROCm",
    "vulkan": "Vulkan",
    "sycl": "SYCL",
}
ORT_PROVIDERS = {
    "cuda": "CUDAExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "directml": "DmlExecutionProvider",
}


def llama_cpp_accelerators() -> list[str]:
    """GPU back-ends compiled into llama-cpp-python (empty for a CPU-only build)."""
    import llama_cpp

    if not llama_cpp.llama_supports_gpu_offload():
        return []
    info = llama_cpp.llama_print_system_info().decode("utf-8", "replace")
    listed = {part.split(":")[0].strip() for part in info.split("|") if ":" in part}
    return [name for name, ggml in LLAMA_CPP_BACKENDS.items() if ggml in listed]


def onnxruntime_accelerators() -> list[str]:
    """Execution providers other than the CPU's that this onnxruntime build offers."""
    import onnxruntime

    available = set(onnxruntime.get_available_providers())
    return [name for name, provider in ORT_PROVIDERS.items() if provider in available]


def torch_accelerators() -> list[str]:
    import torch

    found = []
    if torch.cuda.is_available():
        found.append("cuda")
    if torch.backends.mps.is_available():
        found.append("mps")
    return found


PROBES = {
    "gguf": llama_cpp_accelerators,
    "onnx": onnxruntime_accelerators,
    "hf": torch_accelerators,
}


def accelerators(kind: str) -> list[str]:
    """Accelerator devices available here for an artifact of ``kind`` (gguf, onnx, hf)."""
    return PROBES[kind]()


def require(device: str, kind: str) -> None:
    """Raise unless ``device`` is ``cpu`` or an accelerator available for ``kind``."""
    if device == "cpu":
        return
    found = accelerators(kind)
    if device not in found:
        raise DeviceUnavailableError(
            f"device {device!r} is not available for {kind} artifacts on this machine "
            f"(available: {', '.join(['cpu', *found])})",
            hint="use --devices cpu, or install a build of the back-end with that accelerator",
        )
