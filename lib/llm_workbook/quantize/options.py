"""The options of ``llmc quantize`` and what it returns: methods and their defaults, checked once."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from llm_workbook.paths import REPO_ROOT
from llm_workbook import corpus
from llm_workbook import quantize as ptq
from llm_workbook.errors import QuantizeError

PTQ_METHODS = ("int8", "int4", "int2", "gptq")
ANGELSLIM_METHODS = ("fp8_static", "fp8_dynamic", "int8_dynamic", "int4_gptq", "int4_awq", "w4a8_fp8")
BACKENDS = ("ptq", "angelslim", "aios")
AIOS_METHODS = ("int8", "int2")  # AI-OS's ArrowQuantizer: int8 per channel, int2 in groups of 128 (its defaults)
OUT_FORMATS = ("parquet", "gptq")
# Defaults per method: (bits, group_size, symmetric). Symmetric INT2 is ternary ({-1, 0, 1} * scale),
# so INT2 defaults to asymmetric (4 levels).
METHOD_DEFAULTS: dict[str, tuple[int, int, bool]] = {
    "int8": (8, -1, True),
    "int4": (4, 128, True),
    "int2": (2, 128, False),
    "gptq": (4, 128, True),
}
# The same quantization on the other backend (compare_backends). AngelSlim has no plain RTN INT4, so
# int4 pairs with its GPTQ; FP8 has no counterpart of ours.
COUNTERPARTS: dict[str, dict[str, str]] = {
    "ptq": {"int8_dynamic": "int8", "int4_gptq": "gptq", "int4_awq": "int4", "w4a8_fp8": "int4"},
    "angelslim": {"int8": "int8_dynamic", "gptq": "int4_gptq", "int4": "int4_gptq"},
    "aios": {"int8_dynamic": "int8", "int2": "int2"},
}
GPTQ_V1_BITS = (2, 3, 4, 8)
# AngelSlim methods whose YAML takes a group size (128 by default).
ANGELSLIM_GROUP_METHODS = frozenset({"int4_gptq", "int4_awq", "w4a8_fp8"})
ANGELSLIM_PYTHON = REPO_ROOT / ".venv-angelslim" / "bin" / "python"
ANGELSLIM_SCRIPT = REPO_ROOT / "tools" / "angelslim" / "run_ptq.py"
CALIBRATION_CORPUS = corpus.DEFAULT_CORPUS
TORCH_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class QuantizeResult:
    """What one quantization wrote."""

    output: Path
    backend: str
    method: str
    out_format: str
    options: dict[str, Any]
    layers: list[str]  # quantized Linear modules
    quantized_bits_per_weight: float | None  # stored bits per weight of those Linears (codes + scales + zeros)
    seconds: float
    quantized: dict[str, ptq.QuantizedLinear] | None = field(default=None, repr=False)  # ptq backend only


@dataclass
class ComparisonResult:
    """Both backends' outputs, and their evaluations against the source when ``evaluation`` is available."""

    results: dict[str, QuantizeResult]
    evaluations: dict[str, Any] | None
    note: str


# ==================================================================================================
# Options
# ==================================================================================================


@dataclass
class Options:
    method: str
    bits: int
    group_size: int
    symmetric: bool
    skip: tuple[str, ...]
    act_order: bool
    calib_samples: int
    calib_seq_len: int
    seed: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": self.method, "bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
            "skip": list(self.skip), "act_order": self.act_order,
            **({"calibration": calibration_record(self.calib_samples, self.calib_seq_len, self.seed)}
               if self.method == "gptq" else {}),
        }


def calibration_record(samples: int, seq_len: int, seed: int) -> dict[str, Any]:
    return {"corpus": CALIBRATION_CORPUS, "split": "train", "samples": samples, "seq_len": seq_len, "seed": seed}


def ptq_options(method: str, bits: int | None, group_size: int | None, symmetric: bool | None,
                 skip: Sequence[str] | None, act_order: bool, calib_samples: int, calib_seq_len: int, seed: int,
                 out_format: str) -> Options:
    if method not in PTQ_METHODS:
        hint = " (an AngelSlim method: pass backend='angelslim')" if method in ANGELSLIM_METHODS else ""
        raise QuantizeError(f"unknown method {method!r}{hint}; backend 'ptq' supports {list(PTQ_METHODS)}")
    default_bits, default_group, default_sym = METHOD_DEFAULTS[method]
    if bits is None:
        bits = default_bits
    elif method != "gptq" and bits != default_bits:
        raise QuantizeError(f"method {method!r} means {default_bits}-bit codes, but bits={bits} was given "
                            f"(use method 'gptq' for other widths)")
    if not isinstance(bits, int) or not ptq.MIN_BITS <= bits <= ptq.MAX_BITS:
        raise QuantizeError(f"bits must be an int in [{ptq.MIN_BITS}, {ptq.MAX_BITS}], got {bits!r}")
    group_size = default_group if group_size is None else group_size
    if not isinstance(group_size, int) or (group_size != -1 and group_size < 1):
        raise QuantizeError(f"group_size must be -1 (per channel) or a positive int, got {group_size!r}")
    if act_order and method != "gptq":
        raise QuantizeError(f"act_order only applies to method 'gptq', not {method!r}")
    if out_format == "gptq" and bits not in GPTQ_V1_BITS:
        raise QuantizeError(f"the GPTQ v1 layout holds {list(GPTQ_V1_BITS)}-bit codes, not {bits}")
    if method == "gptq" and (calib_samples < 1 or calib_seq_len < 2):
        raise QuantizeError(f"calib_samples must be >= 1 and calib_seq_len >= 2, got {calib_samples}, {calib_seq_len}")
    skip = ptq.DEFAULT_SKIP if skip is None else tuple(skip)
    return Options(method, bits, group_size, default_sym if symmetric is None else bool(symmetric), skip,
                    bool(act_order), calib_samples, calib_seq_len, seed)


def check_output(out: Path, out_format: str) -> None:
    """Fail before any work when OUT cannot be written."""
    if not out.parent.is_dir():
        raise QuantizeError(f"{out}: output directory {out.parent} does not exist")
    if out_format == "parquet":
        if out.is_dir():
            raise QuantizeError(f"{out}: is a directory; the Parquet output must be a file path")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise QuantizeError(f"{out}: the GPTQ output directory exists and is not empty")
