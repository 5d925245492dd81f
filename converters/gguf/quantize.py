"""llama.cpp quantization types as data, and the call into ``llama_model_quantize``."""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from pathlib import Path

from shortgpt_export.errors import ExportError, ShortGPTError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantType:
    name: str  # as users write it, upper case: "Q4_K_M"
    ftype: str  # llama_cpp constant
    needs_imatrix: bool = False
    exact: bool = False  # no rounding beyond the float format (F32/F16/BF16)


def _q(name: str, **kw) -> QuantType:
    prefix = "LLAMA_FTYPE_ALL_" if name == "F32" else "LLAMA_FTYPE_MOSTLY_"
    return QuantType(name, prefix + name, **kw)


QUANT_TYPES: dict[str, QuantType] = {
    q.name: q
    for q in (
        _q("F32", exact=True), _q("F16", exact=True), _q("BF16", exact=True),
        _q("Q8_0"), _q("Q6_K"), _q("Q5_K_M"), _q("Q5_K_S"), _q("Q5_1"), _q("Q5_0"),
        _q("Q4_K_M"), _q("Q4_K_S"), _q("Q4_1"), _q("Q4_0"),
        _q("Q3_K_L"), _q("Q3_K_M"), _q("Q3_K_S"), _q("Q2_K"),
        _q("IQ4_NL"), _q("IQ4_XS"), _q("IQ3_M"), _q("IQ3_S"), _q("IQ3_XS"), _q("IQ3_XXS"),
        _q("IQ2_M"), _q("TQ1_0"), _q("TQ2_0"),
        # llama-quantize refuses these without an importance matrix
        _q("IQ2_XXS", needs_imatrix=True), _q("IQ2_XS", needs_imatrix=True),
        _q("IQ2_S", needs_imatrix=True), _q("Q2_K_S", needs_imatrix=True),
        _q("IQ1_S", needs_imatrix=True), _q("IQ1_M", needs_imatrix=True),
    )
}  # fmt: skip


def parse_quant(name: str) -> QuantType:
    """The quant type for a case-insensitive name; raises listing the valid ones."""
    quant = QUANT_TYPES.get(name.strip().upper())
    if quant is None:
        usable = [q.name for q in QUANT_TYPES.values() if not q.needs_imatrix]
        raise ShortGPTError(
            f"unknown GGUF quant type {name!r}", hint=f"valid types: {', '.join(usable)}"
        )
    if quant.needs_imatrix:
        raise ShortGPTError(
            f"quant type {quant.name} needs an importance matrix (imatrix), which "
            "shortgpt-export does not compute",
            hint="use IQ3_S, IQ4_XS, Q2_K or a larger type",
        )
    return quant


def parse_quant_list(text: str | list[str] | None) -> list[QuantType]:
    if not text:
        return []
    names = text.split(",") if isinstance(text, str) else text
    quants: list[QuantType] = []
    for name in names:
        if name.strip() and (quant := parse_quant(name)) not in quants:
            quants.append(quant)
    return quants


def quantize_gguf(src: Path, dst: Path, quant: QuantType, *, threads: int = 0) -> None:
    """Run llama.cpp's quantizer on ``src`` (requantizing allowed) into ``dst``."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, quant.ftype)
    params.allow_requantize = True
    params.nthread = threads
    code = llama_cpp.llama_model_quantize(
        str(src).encode(), str(dst).encode(), ctypes.byref(params)
    )
    if code != 0 or not dst.is_file():
        raise ExportError(
            f"llama.cpp could not quantize {src.name} to {quant.name} (code {code})",
            hint="run with -v to see llama.cpp's log",
        )
