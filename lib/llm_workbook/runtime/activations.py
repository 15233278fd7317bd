"""Activation quantization as a checkpoint declares it: the schemes, their fake-quant kernels, and the
Linear that quantizes its input before the matmul."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from llm_workbook.formats._codec import FP8_MAX
from llm_workbook.formats.compressed_tensors import CT_METHOD, ct_scheme_for

INT8_MIN, INT8_MAX = -128, 127


# ============================================================================================
# Activation fake quantization
# ============================================================================================


@dataclass(frozen=True)
class ActivationScheme:
    """How a Linear's input is quantized at serving time.

    ``kind``: "fp8" (float8_e4m3fn) or "int8"; ``granularity``: "tensor" (one scale per call or a
    stored one), "token" (one scale per row of the last dim) or "group" (per ``group_size`` inputs
    of each token); ``dynamic``: scales computed from each input (else the stored ``input_scale``).
    """

    kind: str
    granularity: str
    dynamic: bool
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("fp8", "int8"):
            raise ValueError(f"activation kind must be 'fp8' or 'int8', got {self.kind!r}")
        if self.granularity not in ("tensor", "token", "group"):
            raise ValueError(f"activation granularity must be tensor/token/group, got {self.granularity!r}")
        if not self.dynamic and self.granularity != "tensor":
            raise ValueError("static activation scales are per tensor only")
        if self.granularity == "group" and not (isinstance(self.group_size, int) and self.group_size > 0):
            raise ValueError(f"group activation quantization needs a positive group_size, got {self.group_size!r}")

    @property
    def name(self) -> str:
        """E.g. ``fp8-static-tensor``, ``fp8-dynamic-tensor``, ``int8-dynamic-token``, ``fp8-dynamic-group128``."""
        mode = "dynamic" if self.dynamic else "static"
        gran = f"group{self.group_size}" if self.granularity == "group" else self.granularity
        return f"{self.kind}-{mode}-{gran}"


def _safe_scale(scale: torch.Tensor) -> torch.Tensor:
    # An all-zero input has scale 0; any positive scale maps it to 0 and back, so use 1.
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def fp8_fake_quant(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """``x -> float8_e4m3fn(clamp(x / s, +-448)) * s`` in float32, returned in ``x.dtype``."""
    s = torch.as_tensor(scale, dtype=torch.float32)
    scaled = (x.to(torch.float32) / s).clamp(-FP8_MAX, FP8_MAX)
    return (scaled.to(torch.float8_e4m3fn).to(torch.float32) * s).to(x.dtype)


def int8_fake_quant(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """``x -> clamp(round(x / s), -128, 127) * s`` in float32 (round half to even), returned in ``x.dtype``."""
    s = torch.as_tensor(scale, dtype=torch.float32)
    codes = torch.round(x.to(torch.float32) / s).clamp(INT8_MIN, INT8_MAX)
    return (codes * s).to(x.dtype)


def fake_quantize_activation(x: torch.Tensor, scheme: ActivationScheme, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize a Linear input ``[..., in]`` as the serving kernel would.

    Dynamic scales: per tensor ``absmax(x) / qmax``; per token ``absmax(row) / qmax``; per group
    ``absmax(row[g]) / qmax`` (qmax 448 for fp8, 127 for int8; a width that is not a multiple of the group
    size ends in a shorter group). Static: the stored ``scale``.
    """
    qmax = FP8_MAX if scheme.kind == "fp8" else float(INT8_MAX)
    quant = fp8_fake_quant if scheme.kind == "fp8" else int8_fake_quant
    if not scheme.dynamic:
        if scale is None:
            raise ValueError(f"static {scheme.kind} activation quantization needs an input scale")
        return quant(x, scale.to(torch.float32).reshape(()))
    absx = x.detach().to(torch.float32).abs()
    if scheme.granularity == "tensor":
        return quant(x, _safe_scale(absx.amax() / qmax))
    if scheme.granularity == "token":
        return quant(x, _safe_scale(absx.amax(dim=-1, keepdim=True) / qmax))
    size = scheme.group_size
    width = x.shape[-1]
    pad = -width % size  # a width that is not a multiple takes a shorter last group, as ragged weight blocks do
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
        absx = torch.nn.functional.pad(absx, (0, pad))  # zeros never raise a group's absmax
    grouped = x.reshape(*x.shape[:-1], x.shape[-1] // size, size)
    scales = _safe_scale(absx.reshape(grouped.shape).amax(dim=-1, keepdim=True) / qmax)
    return quant(grouped, scales).reshape(x.shape)[..., :width]


class InputQuantizer(nn.Module):
    """Fake-quantizes a Linear's input. The static scale is a plain float32 attribute (not a buffer),
    so ``model.to(dtype)`` cannot round it."""

    def __init__(self, scheme: ActivationScheme, scale: torch.Tensor | None = None):
        super().__init__()
        if not scheme.dynamic and scale is None:
            raise ValueError(f"{scheme.name} needs an input scale")
        self.scheme = scheme
        self.scale = None if scale is None else scale.detach().to(torch.float32).reshape(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize_activation(x, self.scheme, self.scale)

    def extra_repr(self) -> str:
        return self.scheme.name + ("" if self.scale is None else f", scale={float(self.scale):.6g}")


class QuantInputLinear(nn.Linear):
    """An ``nn.Linear`` (sharing the original weight and bias) that fake-quantizes its input first."""

    def __init__(self, linear: nn.Linear, quantizer: InputQuantizer):
        nn.Module.__init__(self)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.input_quantizer = quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quantizer(x), self.weight, self.bias)


# ============================================================================================
# What the checkpoint declares about activations
# ============================================================================================


def layer_type(name: str) -> str:
    """A module name with its layer indices replaced by ``*`` (``model.layers.*.self_attn.q_proj``)."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name)


def _scheme_from_args(args: dict) -> ActivationScheme | str:
    """compressed-tensors ``input_activations`` -> a scheme, or a note saying why it is not simulated."""
    bits, kind = int(args.get("num_bits", 8)), args.get("type", "int")
    if bits != 8 or kind not in ("int", "float"):
        return f"{bits}-bit {kind} input activations are not simulated"
    dynamic = args.get("dynamic") not in (False, None)
    strategy = args.get("strategy") or ("group" if args.get("group_size") else "tensor")
    if not dynamic and strategy != "tensor":
        return f"static {strategy} input activations are not simulated"
    if strategy not in ("tensor", "token", "group"):
        return f"{strategy} input activations are not simulated"
    return ActivationScheme("fp8" if kind == "float" else "int8", strategy, dynamic,
                            int(args["group_size"]) if strategy == "group" else None)


def declared_activation(qconfig: dict | None, layer_name: str, fmt: str, has_input_scale: bool) -> ActivationScheme | str | None:
    """The input quantization a quantized layer's checkpoint declares.

    Returns an ``ActivationScheme``, a note (str) when it is declared but not simulated, or None
    (weight-only). Sources, most specific first: a compressed-tensors config group's
    ``input_activations``; ``quant_method: fp8`` / ``w4a8_awq`` ``activation_scheme`` (block FP8
    weights take per-token groups of the block width, DeepSeek-V3 style); else a stored
    ``input_scale`` alone means static per-tensor input quantization of the format's kind.
    """
    qconfig = qconfig or {}
    method = qconfig.get("quant_method")
    if method == CT_METHOD:
        group = ct_scheme_for(qconfig, layer_name)
        acts = (group or {}).get("input_activations")
        if isinstance(acts, dict):
            return _scheme_from_args(acts)
    elif method == "w4a8_awq" and fmt != "w4a8" and isinstance(qconfig.get("ignored_quantization_config"), dict):
        # DeepSeek-style W4A8: the layers left out of W4A8 follow their own (FP8 block) config
        return declared_activation(qconfig["ignored_quantization_config"], layer_name, fmt, has_input_scale)
    elif method in ("fp8", "w4a8_awq") and qconfig.get("activation_scheme") in ("static", "dynamic"):
        if qconfig["activation_scheme"] == "static":
            return ActivationScheme("fp8", "tensor", False)
        block = qconfig.get("weight_block_size")
        if fmt == "fp8" and isinstance(block, list) and len(block) == 2:
            return ActivationScheme("fp8", "group", True, int(block[1]))
        return ActivationScheme("fp8", "tensor", True)
    if has_input_scale:
        if fmt in ("fp8", "w4a8"):
            return ActivationScheme("fp8", "tensor", False)
        if fmt == "int8":
            return ActivationScheme("int8", "tensor", False)
        return f"{fmt} input activations (input_scale) are not simulated"
    return None
