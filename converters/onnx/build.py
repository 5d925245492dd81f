"""Make the ONNX folders: optimum export to fp32, then onnxruntime tools for the rest."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from shortgpt_export.errors import ExportError

from .precisions import Precision

log = logging.getLogger(__name__)

EXTERNAL_DATA_OVER = 1_800_000_000  # protobuf's 2 GB limit, with headroom
MODEL_FILE = "model.onnx"
INT8_WEIGHT_ONLY_BLOCK = 32


def optimum_supports(model_type: str) -> bool:
    """Whether optimum can export ``model_type`` as a decoder with a KV cache."""
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the families)
    from optimum.exporters.tasks import TasksManager

    try:
        tasks = TasksManager.get_supported_tasks_for_model_type(
            model_type.replace("_", "-"), "onnx", library_name="transformers"
        )
    except (KeyError, ValueError):
        return False
    return "text-generation-with-past" in tasks


def check_family(spec) -> None:
    """Refuse ``--to onnx`` for a family optimum cannot export, naming it."""
    try:
        supported = optimum_supports(spec.model_type)
    except ImportError:
        return  # export_fp32 says what to install
    if not supported:
        raise ExportError(
            f"ONNX export of {spec.display_name} ({spec.model_type}) is not possible: "
            "optimum has no ONNX decoder export for this family",
            hint="export --to hf" + (" or --to gguf" if spec.gguf_converter else "") + " instead",
        )


def export_fp32(hf_dir: Path, out: Path) -> None:
    """optimum's decoder-with-KV-cache export of a Hugging Face folder."""
    try:
        from optimum.exporters.onnx import main_export
    except ImportError as exc:
        raise ExportError(
            "ONNX export needs optimum-onnx and onnxruntime",
            hint="pip install 'shortgpt-export[onnx]'",
        ) from exc
    try:
        main_export(
            model_name_or_path=str(hf_dir),
            output=str(out),
            task="text-generation-with-past",
            device="cpu",
            do_validation=False,
        )
    except Exception as exc:
        raise ExportError(f"optimum could not export {hf_dir.name} to ONNX: {exc}"[:300]) from exc


def _needs_external_data(path: Path) -> bool:
    return sum(p.stat().st_size for p in path.parent.glob("model.onnx*")) > EXTERNAL_DATA_OVER


def _copy_companions(src: Path, dst: Path) -> None:
    for path in src.iterdir():
        if path.is_file() and not path.name.startswith("model.onnx"):
            shutil.copy2(path, dst / path.name)


def _matmul_nbits(src: Path, target: Path, *, bits: int, block: int, external: bool) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(
        onnx.load(str(src)), bits=bits, block_size=block, is_symmetric=True
    )
    quantizer.process()
    quantizer.model.save_model_to_file(str(target), use_external_data_format=external)


def derive(
    fp32_dir: Path,
    out: Path,
    precision: Precision,
    *,
    int4_block: int,
    int8_mode: str = "dynamic",
) -> None:
    """Write ``out`` with the ``precision`` version of the fp32 model in ``fp32_dir``.

    int8 is onnxruntime's dynamic quantization (int8 weights, activations quantized per
    tensor at run time) or, with ``int8_mode="weight-only"``, 8-bit blocked MatMulNBits
    weights with float activations.
    """
    import onnx

    src = fp32_dir / MODEL_FILE
    out.mkdir(parents=True, exist_ok=True)
    external = _needs_external_data(src)
    target = out / MODEL_FILE
    if precision.name == "int8" and int8_mode == "weight-only":
        _matmul_nbits(src, target, bits=8, block=INT8_WEIGHT_ONLY_BLOCK, external=external)
    elif precision.name == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(
            str(src),
            str(target),
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul"],
            use_external_data_format=external,
        )
    elif precision.name == "int4":
        _matmul_nbits(src, target, bits=4, block=int4_block, external=external)
    elif precision.name == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = convert_float_to_float16(
            onnx.load(str(src)), keep_io_types=True, disable_shape_infer=True
        )
        onnx.save(
            model,
            str(target),
            save_as_external_data=external,
            location=MODEL_FILE + "_data" if external else None,
        )
    else:
        raise ExportError(f"no recipe for ONNX precision {precision.name}")
    _copy_companions(fp32_dir, out)
