"""ONNX precisions as data: how each one is made from the fp32 export."""

from __future__ import annotations

from dataclasses import dataclass

from shortgpt_export.errors import ShortGPTError

INT8_MODES = ("dynamic", "weight-only")


@dataclass(frozen=True)
class Precision:
    name: str  # folder suffix and flag: onnx-<name>/, --<name>
    method: str  # what onnxruntime does to the fp32 graph
    exact: bool  # compared with torch by max |log-prob diff|, not only KL


PRECISIONS: dict[str, Precision] = {
    p.name: p
    for p in (
        Precision("fp32", "optimum export, text-generation-with-past", exact=True),
        Precision("fp16", "float16 weights and activations, fp32 inputs/outputs", exact=False),
        Precision(
            "int8",
            "8-bit MatMul weights (dynamic: int8 activations at run time; "
            "weight-only: 8-bit blocked MatMulNBits, float activations)",
            exact=False,
        ),
        Precision("int4", "4-bit weight-only MatMulNBits, symmetric, blocked", exact=False),
    )
}


def parse_precisions(names: list[str] | None) -> list[Precision]:
    """Requested precisions in a fixed order; fp32 alone when none is asked for."""
    names = [n.strip().lower() for n in (names or []) if n.strip()] or ["fp32"]
    unknown = [n for n in names if n not in PRECISIONS]
    if unknown:
        raise ShortGPTError(
            f"unknown ONNX precision {unknown[0]!r}", hint=f"use {', '.join(PRECISIONS)}"
        )
    return [p for name, p in PRECISIONS.items() if name in names]


def check_int4_block(block: int, sizes: dict[str, int] | None = None) -> None:
    """The block size must be a power of two >= 16 and divide every MatMul input size."""
    if block < 16 or block & (block - 1):
        raise ShortGPTError(
            f"--int4-block-size {block} is not a power of two >= 16", hint="use 16, 32, 64 or 128"
        )
    for key, size in (sizes or {}).items():
        if size % block:
            raise ShortGPTError(
                f"--int4-block-size {block} does not divide the model's {key} ({size})",
                hint="choose a block size that divides "
                + " and ".join(f"{k}={v}" for k, v in sizes.items()),
            )
