"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers") is implemented from the paper's Algorithm 1: Cholesky factor of the damped inverse
Hessian, column-by-column quantization with optimal-brain-surgeon error feedback, lazy batched updates
per block of columns, optional act-order and static groups.  See :func:`run_gptq` for the details where
we deviate from the reference code.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from llm_workbook.quantize.rtn import (
    QuantizedLinear, check_bits, check_group_size, check_weight, group_params, quantize_values,
)


class GPTQError(RuntimeError):
    """GPTQ could not run on a layer (e.g. its Hessian stays non positive definite after damping)."""


class HessianAccumulator:
    """Running ``H = 2/n * sum_x x x^T`` over every input row ``x`` a Linear receives.

    Kept as a running mean (rescaled at each batch) so it never overflows; accumulated in ``dtype``
    (float32 by default, float64 for extra accuracy).  Use :meth:`attach` to collect from a module's
    forward pre-hook, or :meth:`add_batch` directly.
    """

    def __init__(self, in_features: int, dtype: torch.dtype = torch.float32, name: str = "linear") -> None:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"{name}: Hessian dtype must be float32 or float64, got {dtype}")
        self.name = name
        self.dtype = dtype
        self.hessian = torch.zeros(in_features, in_features, dtype=dtype)
        self.n_samples = 0

    @property
    def in_features(self) -> int:
        return int(self.hessian.shape[0])

    def add_batch(self, inputs: torch.Tensor) -> None:
        """Add activations ``[..., in]`` (every leading index is one sample row)."""
        if inputs.shape[-1] != self.in_features:
            raise ValueError(f"{self.name}: activations have {inputs.shape[-1]} features, expected {self.in_features}")
        x = inputs.detach().reshape(-1, self.in_features).to(self.dtype)
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{self.name}: calibration activations contain NaN/inf")
        n_new = x.shape[0]
        if n_new == 0:
            return
        total = self.n_samples + n_new
        self.hessian *= self.n_samples / total
        self.hessian.addmm_(x.t(), x, alpha=2.0 / total)
        self.n_samples = total

    def attach(self, module: nn.Module) -> torch.utils.hooks.RemovableHandle:
        """Collect from ``module``'s input on every forward; remove the returned handle when done."""

        def pre_hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            self.add_batch(args[0] if args else kwargs["input"])

        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)


@dataclass
class GPTQResult:
    """Everything :func:`run_gptq` knows: the codes, the weight it computed, and diagnostics."""

    quantized: QuantizedLinear
    dequantized: torch.Tensor  # float32 [out, in], original column order: what GPTQ chose
    loss: float  # sum over weights of (w - q)^2 / (2 U_jj^2), U = chol(H^-1): the OBS error GPTQ incurred
    damp_percent: float  # damping actually used (may be larger than asked, see run_gptq)
    dead_columns: int


def _float64_hessian(hessian: torch.Tensor, dead: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    """``hessian`` in float64 (Cholesky of an ill-conditioned H is fragile in float32), dead inputs set to
    ``H_jj = 1``, rows and columns in processing order."""
    if order is not None:  # permuted in float32, then cast: the same values with one float64 matrix alive
        hessian = hessian.detach()[order.unsqueeze(1), order]
        dead = torch.argsort(order)[dead]
    h = hessian.detach().to(torch.float64, copy=True)
    h[dead, dead] = 1.0
    return h


def _upper_cholesky_of_inverse(
    hessian: torch.Tensor, dead: torch.Tensor, order: torch.Tensor | None, damp_percent: float, name: str,
    max_tries: int = 5,
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1`` for H as ``_float64_hessian`` makes it,
    raising damping ten-fold on failure.

    The float64 H is rebuilt for each attempt rather than kept beside its factors: for a 14 k-wide
    down_proj each [in, in] float64 matrix is 1.5 GB, and at most two exist at once.
    """
    mean_diag = None
    damp = damp_percent
    for attempt in range(max_tries):
        damped = _float64_hessian(hessian, dead, order)
        if mean_diag is None:
            mean_diag = float(torch.diagonal(damped).mean())
        damped.diagonal().add_(damp * mean_diag)
        lower, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            del lower
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if int(info) == 0 and bool(torch.isfinite(upper).all()):
                if attempt:
                    warnings.warn(f"{name}: Hessian needed damp_percent={damp:g} (asked {damp_percent:g})", stacklevel=3)
                return upper, damp
        damp *= 10.0
    raise GPTQError(
        f"{name}: Cholesky of the damped Hessian failed even with damp_percent={damp / 10:g} "
        f"(mean diag {mean_diag:g}); the Hessian is not positive semi-definite. Not falling back to RTN."
    )


def run_gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    symmetric: bool = True,
    damp_percent: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
    name: str = "weight",
) -> GPTQResult:
    """GPTQ-quantize ``weight [out, in]`` given the input Hessian ``H [in, in]`` (see :class:`HessianAccumulator`).

    Steps (Frantar et al. 2022, Algorithm 1):

    1. Dead inputs (``H_jj == 0``: the column never saw a non-zero activation) get ``H_jj = 1``; their
       weights are kept (the reference zeroes them; calibration silence does not prove inference
       silence), and since their H rows are zero they neither receive nor spread error.
    2. With ``act_order`` the columns are processed by descending ``diag(H)``.
    3. ``H += damp_percent * mean(diag H) * I``; ``U = chol(H^-1)`` (upper).  If a Cholesky fails,
       damping is raised ten-fold up to 4 times, then :class:`GPTQError` is raised.
    4. Columns are quantized one by one; the error ``(w - q) / U_jj`` is spread over the remaining
       columns of the block at once and over later blocks lazily, once per block.
    5. Groups: without ``static_groups`` a group's scale/zero are computed when its first column is
       reached, from the *current* (error-updated) values of its columns, including the pending updates
       of the running block (the reference reads stale values there when a group starts mid-block).
       With act-order, groups are consecutive in processing order, so ``g_idx`` becomes a non-trivial
       map.  ``static_groups`` computes every group from the original weight before any update, in
       original column order (``g_idx`` stays trivial, also with act-order).
    6. Codes, dequantized weight and ``g_idx`` are returned in original column order.
    """
    check_bits(bits)
    check_group_size(group_size)
    check_weight(weight, name)
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"{name}: block_size must be a positive int, got {block_size!r}")
    if not damp_percent > 0:
        raise ValueError(f"{name}: damp_percent must be > 0, got {damp_percent!r}")
    out_features, in_features = weight.shape
    if not isinstance(hessian, torch.Tensor) or hessian.shape != (in_features, in_features):
        shape = tuple(hessian.shape) if isinstance(hessian, torch.Tensor) else type(hessian).__name__
        raise ValueError(f"{name}: Hessian must be [{in_features}, {in_features}], got {shape}")
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError(f"{name}: Hessian contains NaN/inf")

    w = weight.detach().to(torch.float32).clone()
    diagonal = torch.diagonal(hessian).detach().to(torch.float64, copy=True)
    dead = torch.nonzero(diagonal == 0).squeeze(1)
    diagonal[dead] = 1.0

    size = in_features if group_size == -1 else group_size
    n_groups = math.ceil(in_features / size)
    scales = torch.zeros(out_features, n_groups, dtype=torch.float32)
    zeros = torch.zeros(out_features, n_groups, dtype=torch.float32)
    params_ready = group_size == -1 or static_groups
    if params_ready:
        # Per channel, or static groups: every group from the weight as given (before any update).
        padded = torch.nn.functional.pad(w, (0, n_groups * size - in_features)).view(out_features, n_groups, size)
        scales, zeros = group_params(padded, bits, symmetric)

    order = torch.argsort(diagonal, descending=True, stable=True) if act_order else torch.arange(in_features)
    if act_order:
        w = w[:, order]
    # Group of each position in processing order.
    if params_ready:
        group_of_position = order // size
    else:
        group_of_position = torch.arange(in_features) // size

    upper_f64, damp_used = _upper_cholesky_of_inverse(hessian, dead, order if act_order else None, damp_percent, name)
    upper = upper_f64.to(torch.float32)
    del upper_f64

    codes = torch.zeros(out_features, in_features, dtype=torch.uint8)
    dequant = torch.zeros(out_features, in_features, dtype=torch.float32)
    loss = torch.zeros((), dtype=torch.float64)
    for start in range(0, in_features, block_size):
        stop = min(start + block_size, in_features)
        block = w[:, start:stop].clone()
        block_err = torch.zeros_like(block)
        u_block = upper[start:stop, start:stop]
        for i in range(stop - start):
            col = start + i
            if not params_ready and col % size == 0:
                current = _current_group_columns(w, block, block_err, upper, start, stop, i, size)
                scale_g, zero_g = group_params(current, bits, symmetric)
                scales[:, col // size] = scale_g
                zeros[:, col // size] = zero_g
            group = int(group_of_position[col])
            scale, zero = scales[:, group], zeros[:, group]
            column = block[:, i]
            q = quantize_values(column, scale, zero, bits)
            dq = scale * (q - zero)
            codes[:, col] = q
            dequant[:, col] = dq
            diag = u_block[i, i]
            err = (column - dq) / diag
            block[:, i:] -= err.unsqueeze(1) * u_block[i, i:].unsqueeze(0)
            block_err[:, i] = err
        loss += (block_err.double() ** 2).sum() / 2
        # Lazy batch update: everything right of this block at once.
        w[:, stop:] -= block_err @ upper[start:stop, stop:]

    inverse_order = torch.argsort(order)
    quantized = QuantizedLinear(
        codes=codes[:, inverse_order],
        scales=scales.to(torch.float32),
        zeros=zeros.to(torch.int32),
        bits=bits,
        group_size=group_size,
        symmetric=symmetric,
        g_idx=group_of_position[inverse_order].to(torch.int32),
        perm=order.clone() if act_order else None,
        method="gptq",
    )
    return GPTQResult(
        quantized=quantized,
        dequantized=dequant[:, inverse_order].contiguous(),
        loss=float(loss),
        damp_percent=damp_used,
        dead_columns=int(dead.numel()),
    )


def _current_group_columns(
    w: torch.Tensor,
    block: torch.Tensor,
    block_err: torch.Tensor,
    upper: torch.Tensor,
    start: int,
    stop: int,
    i: int,
    size: int,
) -> torch.Tensor:
    """Current values of the group starting at block column ``i``, pending lazy updates included."""
    col = start + i
    end = min(col + size, w.shape[1])
    inside = block[:, i : min(end, stop) - start]
    if end <= stop:
        return inside
    # Columns beyond the running block have not yet received this block's errors so far.
    beyond = w[:, stop:end] - block_err[:, :i] @ upper[start:col, stop:end]
    return torch.cat([inside, beyond], dim=1)


def gptq_quantize(weight: torch.Tensor, H: torch.Tensor, **options: Any) -> QuantizedLinear:
    """GPTQ codes and parameters of ``weight`` for Hessian ``H``: :func:`run_gptq` (same options) without its diagnostics."""
    return run_gptq(weight, H, **options).quantized
