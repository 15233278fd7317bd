"""Weight-only integer kernels on the CPU: a quantized Linear kept as integer codes and run by PyTorch's own
matmuls, ``aten._weight_int8pack_mm`` (int8 codes, one scale per output channel) and
``aten._weight_int4pack_mm_for_cpu`` (4-bit codes in groups along the input, a scale and a zero per group).

This is how the checkpoint would run in an engine with such kernels (torchao wraps the same two ops): the
codes stay packed in memory and each decoded token reads them instead of float32 weights. Both kernels
take bfloat16 activations on this path (their fast path on x86; float32 input falls back to a slow
reference loop), so the scales are rounded to bfloat16 as the kernels take them. A layer whose grid maps
onto neither kernel (fp8, nvfp4, int8 in groups, 2-D blocks, act-order groups) stays a dense Linear.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from llm_workbook import formats
from llm_workbook.errors import StoreError
from llm_workbook.formats.base import AffineWeight, QuantizedTensor

INT8_KERNEL = "int8 per channel (aten._weight_int8pack_mm)"
INT4_KERNEL = "int4 groups (aten._weight_int4pack_mm_for_cpu)"
INT4_GROUP_SIZES = (256, 128, 64, 32)  # the group sizes the int4 kernel takes, largest first
PROBE_TOLERANCE = 0.05  # relative error of one probe matmul against the dequantized weight (bfloat16 scales)


class Int8WeightOnlyLinear(nn.Module):
    """``x @ (codes * scales[:, None]).T + bias`` with int8 codes [out, in] held as they are."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.register_buffer("codes", codes.to(torch.int8).contiguous())
        self.register_buffer("scales", scales.to(dtype).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the kernels take a contiguous row-major input; an encoder's attention output reaches them as a view
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features).to(self.scales.dtype).contiguous(),
                                               self.codes, self.scales)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class Int4WeightOnlyLinear(nn.Module):
    """``x @ ((u - 8) * scale + zero).T + bias`` per group of ``group_size`` inputs, u in [0, 15] packed two per byte
    (``perm``: act-order, the input's columns taken in the order the codes were sorted into)."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None, dtype: torch.dtype, perm: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.group_size = group_size
        self.register_buffer("perm", perm)  # act-order: input columns in the order of ``codes``
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
        self.register_buffer("packed", packed)
        # the kernel's layout: [in / group, out, (scale, zero)]
        self.register_buffer("scales_and_zeros", torch.stack([scales.t(), zeros.t()], dim=-1).to(dtype).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(self.scales_and_zeros.dtype)
        x2 = x2.index_select(1, self.perm) if self.perm is not None else x2.contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_and_zeros)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


WEIGHT_ONLY = (Int8WeightOnlyLinear, Int4WeightOnlyLinear)


def kernel_bytes(module: nn.Module) -> int:
    """Bytes a kernel Linear reads per call: its codes, scales (and zeros) and bias."""
    return sum(t.numel() * t.element_size() for t in (*module.buffers(), *module.parameters()))


def _int8(weight: AffineWeight, bias: torch.Tensor | None, dtype: torch.dtype) -> Int8WeightOnlyLinear | None:
    if weight.scales.shape[1] != 1:
        return None
    q = weight.codes.to(torch.float32) - weight.zeros  # one zero per row: whole codes when it is a whole number
    if not torch.equal(q, q.round()) or (q.numel() and (q.min() < -128 or q.max() > 127)):
        return None
    return Int8WeightOnlyLinear(q.to(torch.int8), weight.scales[:, 0], bias, dtype)


def _kernel_groups(g_idx: torch.Tensor) -> int | None:
    """The largest int4 kernel group size whose every group of columns lies in one stored group."""
    for size in INT4_GROUP_SIZES:
        if len(g_idx) % size == 0:
            runs = g_idx.view(-1, size)
            if torch.equal(runs, runs[:, :1].expand_as(runs)):
                return size
    return None


def _int4(weight: AffineWeight, bias: torch.Tensor | None, dtype: torch.dtype) -> Int4WeightOnlyLinear | None:
    if not weight.codes.numel():
        return None
    low, high = int(weight.codes.min()), int(weight.codes.max())
    if high - low > 15:
        return None
    # u = codes + shift in [0, 15]; the kernel subtracts 8, so a shift that brings the zero points near 8 keeps
    # the zero term (8 - z) * s, rounded to bfloat16, small (it matters for 2-bit codes)
    shift = min(max(round(8 - float(weight.zeros.median())), -low), 15 - high)
    perm = None
    size = _kernel_groups(weight.g_idx)
    if size is None:  # act-order: columns sorted by group make contiguous groups; the input is permuted alike
        perm = torch.argsort(weight.g_idx, stable=True)
        size = _kernel_groups(weight.g_idx[perm])
        if size is None:
            return None
    columns = perm if perm is not None else torch.arange(len(weight.g_idx))
    groups = weight.g_idx[columns][::size]  # the stored group of each kernel group
    scales, zeros = weight.scales[:, groups], weight.zeros[:, groups] + shift
    # w = (u - z) * s = (u - 8) * s + (8 - z) * s: the kernel's zero is in weight units
    return Int4WeightOnlyLinear(weight.codes[:, columns] + shift, scales, (8 - zeros) * scales, size, bias, dtype, perm)


def weight_only_linear(record: QuantizedTensor, bias: torch.Tensor | None,
                       dtype: torch.dtype = torch.bfloat16) -> tuple[nn.Module | None, str]:
    """The kernel Linear for a stored layer and the kernel's name, or ``(None, why not)``.

    A probe matmul against the dequantized weight guards the mapping: a kernel that computes something
    else raises StoreError naming the layer instead of running a different model.
    """
    fmt = formats.get_format(record.format)
    weight = fmt.affine(record)
    if weight is None:
        return None, f"{record.format} has no CPU kernel: not an integer grid"
    if weight.bits <= 4 and (module := _int4(weight, bias, dtype)) is not None:
        name = INT4_KERNEL
    elif (module := _int8(weight, bias, dtype)) is not None:
        name = INT8_KERNEL
    else:
        return None, f"{record.format} {weight.bits}-bit has no CPU kernel for this grouping"
    probe = torch.randn(2, weight.codes.shape[1], generator=torch.Generator().manual_seed(0)).to(dtype)
    with torch.inference_mode():
        expected = probe.float() @ fmt.dequantize(record, torch.float32).t()
        got = module(probe).float() - (0 if module.bias is None else module.bias.float())
    error = float((got - expected).norm() / expected.norm().clamp_min(1e-30))
    if not error <= PROBE_TOLERANCE:
        raise StoreError(f"layer {record.layer_name}: the {name} kernel computes another weight "
                         f"(relative error {error:.3g} against the dequantized {record.format} weight)")
    return module, name
