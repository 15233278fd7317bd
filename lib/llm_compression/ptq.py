"""Our own post-training weight quantization: round-to-nearest (RTN) and GPTQ, in plain torch.

Conventions (GPTQ-style, shared by every method here)
-----------------------------------------------------
A quantized Linear weight ``W [out, in]`` is stored as unsigned integer ``codes [out, in]`` in
``[0, 2**bits - 1]``, one float32 ``scale`` and one integer ``zero`` per (output row, group), and
``g_idx [in]`` telling which group each input column belongs to.  The weight is recovered as::

    W ~= scales[:, g_idx] * (codes - zeros[:, g_idx])

* Symmetric: ``scale = absmax / (2**(bits-1) - 1)`` and ``zero = 2**(bits-1)``.  For INT8 per channel
  this is exactly the old default: ``scale = absmax / 127`` per output row, ``q = round(w / scale)``
  in ``[-127, 127]``, stored as ``code = q + 128``.  RTN therefore only produces codes in
  ``[1, 2**bits - 1]``; GPTQ may also use code 0 (``-2**(bits-1)``) because error compensation can
  push a column slightly past the group's absmax.  INT2 symmetric is ternary ({-1, 0, 1} * scale).
* Asymmetric: the range ``[min(w_min, 0), max(w_max, 0)]`` (widened to contain 0 so the zero point is
  exactly representable and lies in range) gives ``scale = (max - min) / (2**bits - 1)`` and
  ``zero = clamp(round(-min / scale), 0, 2**bits - 1)``.
* A group whose values are all zero gets ``scale = 1`` and codes equal to ``zero`` (dequantizes to 0).
* Rounding is ``torch.round`` (half to even).
* ``group_size = -1`` means per channel: one group spanning all ``in`` columns.  ``in % group_size != 0``
  is supported: the last group is simply narrower.

GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers") is implemented from the paper's Algorithm 1: Cholesky factor of the damped inverse
Hessian, column-by-column quantization with optimal-brain-surgeon error feedback, lazy batched updates
per block of columns, optional act-order and static groups.  See :func:`run_gptq` for the details where
we deviate from the reference code.
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .formats._codec import trivial_g_idx

__all__ = [
    "DEFAULT_SKIP",
    "GPTQError",
    "GPTQResult",
    "HessianAccumulator",
    "LayerWeights",
    "QuantizedLinear",
    "fake_quantize_model",
    "find_decoder_layers",
    "find_quantizable_linears",
    "gptq_quantize",
    "quantize_model",
    "quantize_rtn",
    "run_gptq",
]

DEFAULT_SKIP: tuple[str, ...] = ("lm_head", "embed")
RTN_METHODS: dict[str, int] = {"int8": 8, "int4": 4, "int2": 2}
MIN_BITS, MAX_BITS = 2, 8


class GPTQError(RuntimeError):
    """GPTQ could not run on a layer (e.g. its Hessian stays non positive definite after damping)."""


# --------------------------------------------------------------------------------------------------
# Container
# --------------------------------------------------------------------------------------------------


@dataclass
class QuantizedLinear:
    """Codes and parameters of one quantized Linear weight (GPTQ convention, see module docstring).

    ``codes`` is uint8 ``[out, in]`` in original column order, ``scales`` float32 ``[out, n_groups]``,
    ``zeros`` int32 ``[out, n_groups]`` (unsigned zero point), ``g_idx`` int32 ``[in]``.  ``perm`` is the
    act-order processing order used by GPTQ (informational only: codes are already un-permuted).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int
    symmetric: bool
    g_idx: torch.Tensor
    perm: torch.Tensor | None = None
    method: str = field(default="rtn")

    def __post_init__(self) -> None:
        if self.codes.dim() != 2:
            raise ValueError(f"QuantizedLinear.codes must be 2-D [out, in], got shape {tuple(self.codes.shape)}")
        out_features, in_features = self.codes.shape
        if self.scales.dim() != 2 or self.scales.shape[0] != out_features:
            raise ValueError(f"QuantizedLinear.scales must be [{out_features}, n_groups], got {tuple(self.scales.shape)}")
        if self.zeros.shape != self.scales.shape:
            raise ValueError(f"QuantizedLinear.zeros shape {tuple(self.zeros.shape)} != scales shape {tuple(self.scales.shape)}")
        if self.g_idx.shape != (in_features,):
            raise ValueError(f"QuantizedLinear.g_idx must be [{in_features}], got {tuple(self.g_idx.shape)}")
        if in_features and (int(self.g_idx.min()) < 0 or int(self.g_idx.max()) >= self.scales.shape[1]):
            raise ValueError("QuantizedLinear.g_idx points outside [0, n_groups)")

    @property
    def out_features(self) -> int:
        return int(self.codes.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.codes.shape[1])

    @property
    def n_groups(self) -> int:
        return int(self.scales.shape[1])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight ``[out, in]``: ``scales[:, g_idx] * (codes - zeros[:, g_idx])`` in float32, then cast."""
        g_idx = self.g_idx.long()
        scales = self.scales.to(torch.float32)[:, g_idx]
        zeros = self.zeros.to(torch.float32)[:, g_idx]
        return (scales * (self.codes.to(torch.float32) - zeros)).to(dtype)


# --------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an int in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")


def _check_group_size(group_size: int) -> None:
    if not isinstance(group_size, int) or (group_size != -1 and group_size < 1):
        raise ValueError(f"group_size must be -1 (per channel) or a positive int, got {group_size!r}")


def _check_weight(weight: torch.Tensor, name: str) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"{name}: expected a 2-D weight [out, in], got {shape}")
    if not weight.is_floating_point():
        raise ValueError(f"{name}: expected a floating point weight, got {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError(f"{name}: weight is empty {tuple(weight.shape)}")
    finite = torch.isfinite(weight)
    if not bool(finite.all()):
        n_nan = int(torch.isnan(weight).sum())
        n_inf = int((~finite).sum()) - n_nan
        raise ValueError(f"{name}: weight contains non-finite values ({n_nan} NaN, {n_inf} inf)")


def _max_code(bits: int) -> int:
    return 2**bits - 1


def _group_params(values: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and unsigned zero point along the last dim of float32 ``values`` (any leading shape)."""
    if symmetric:
        absmax = values.abs().amax(dim=-1)
        scale = absmax / (2 ** (bits - 1) - 1)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.full_like(scale, 2 ** (bits - 1))
        return scale, zero
    # Widen the range to contain 0 so that the zero point is an in-range integer.
    low = values.amin(dim=-1).clamp(max=0.0)
    high = values.amax(dim=-1).clamp(min=0.0)
    scale = (high - low) / _max_code(bits)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-low / scale).clamp(0, _max_code(bits))
    return scale, zero


def _quantize_values(values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes (as float) of ``values`` with broadcastable ``scale``/``zero``."""
    return torch.clamp(torch.round(values / scale) + zero, 0, _max_code(bits))


# --------------------------------------------------------------------------------------------------
# Round to nearest
# --------------------------------------------------------------------------------------------------


def quantize_rtn(
    weight: torch.Tensor,
    bits: int,
    group_size: int = -1,
    symmetric: bool = True,
    name: str = "weight",
) -> QuantizedLinear:
    """Round-to-nearest quantization of a Linear weight ``[out, in]`` (conventions in the module docstring).

    ``name`` only labels error messages.  Raises ValueError on non-finite weights or bad options.
    """
    _check_bits(bits)
    _check_group_size(group_size)
    _check_weight(weight, name)
    w = weight.detach().to(torch.float32)
    out_features, in_features = w.shape
    size = in_features if group_size == -1 else group_size
    n_groups = math.ceil(in_features / size)
    # Zero padding never changes a group's parameters: both conventions include 0 in the range.
    padded = torch.nn.functional.pad(w, (0, n_groups * size - in_features)).view(out_features, n_groups, size)
    scale, zero = _group_params(padded, bits, symmetric)
    codes = _quantize_values(padded, scale.unsqueeze(-1), zero.unsqueeze(-1), bits)
    codes = codes.view(out_features, n_groups * size)[:, :in_features]
    return QuantizedLinear(
        codes=codes.to(torch.uint8),
        scales=scale.to(torch.float32),
        zeros=zero.to(torch.int32),
        bits=bits,
        group_size=group_size,
        symmetric=symmetric,
        g_idx=trivial_g_idx(in_features, group_size),
        method="rtn",
    )


# --------------------------------------------------------------------------------------------------
# GPTQ
# --------------------------------------------------------------------------------------------------


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
    _check_bits(bits)
    _check_group_size(group_size)
    _check_weight(weight, name)
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
        scales, zeros = _group_params(padded, bits, symmetric)

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
                scale_g, zero_g = _group_params(current, bits, symmetric)
                scales[:, col // size] = scale_g
                zeros[:, col // size] = zero_g
            group = int(group_of_position[col])
            scale, zero = scales[:, group], zeros[:, group]
            column = block[:, i]
            q = _quantize_values(column, scale, zero, bits)
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


# --------------------------------------------------------------------------------------------------
# Model level
# --------------------------------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised inside a hook to end a forward pass once the wanted inputs are recorded."""


_DECODER_LAYER_PATHS = (
    "model.layers",
    "model.decoder.layers",
    "model.language_model.layers",
    "transformer.h",
    "transformer.layers",
    "gpt_neox.layers",
    "layers",
)


def _is_skipped(name: str, skip: Iterable[str]) -> bool:
    for pattern in skip:
        if pattern in name:
            return True
        try:
            if re.search(pattern, name):
                return True
        except re.error:
            pass  # not a regex: the substring test above decided
    return False


def find_quantizable_linears(model: nn.Module, skip: Sequence[str] = DEFAULT_SKIP) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` of ``model`` by full module name, minus those matching a skip pattern.

    A pattern matches when it is a substring of the name or ``re.search`` finds it in the name.
    """
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not _is_skipped(name, skip)
    }


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    for path in _DECODER_LAYER_PATHS:
        try:
            layers = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return path, layers
    raise ValueError(
        f"{type(model).__name__}: no decoder layer list found (looked for {', '.join(_DECODER_LAYER_PATHS)})"
    )


def _calibration_chunks(input_ids: torch.Tensor | Sequence[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """Split calibration ids into ``[b, seq]`` LongTensor chunks (sequences of unequal length go alone)."""
    if batch_size < 1:
        raise ValueError(f"calibration_batch_size must be >= 1, got {batch_size}")
    if isinstance(input_ids, torch.Tensor):
        ids = input_ids.unsqueeze(0) if input_ids.dim() == 1 else input_ids
        if ids.dim() != 2:
            raise ValueError(f"calibration_input_ids must be [n, seq], got shape {tuple(input_ids.shape)}")
        sequences = [ids]
    else:
        sequences = [t.unsqueeze(0) if t.dim() == 1 else t for t in input_ids]
    chunks: list[torch.Tensor] = []
    for seq in sequences:
        if not isinstance(seq, torch.Tensor) or seq.dim() != 2 or seq.numel() == 0:
            raise ValueError("calibration_input_ids: every item must be a non-empty [seq] or [n, seq] tensor")
        if seq.is_floating_point() or seq.dtype == torch.bool:
            raise ValueError(f"calibration_input_ids must hold integer token ids, got {seq.dtype}")
        chunks.extend(seq.long().split(batch_size, dim=0))
    if not chunks:
        raise ValueError("calibration_input_ids is empty")
    return chunks


class LayerWeights(Protocol):
    """Where the weights of a decoder layer come from when the model keeps them on the meta device."""

    def load(self, prefix: str, layer: nn.Module) -> None:
        """Give every parameter of ``layer`` (named ``prefix.<name>`` in the source) its float32 value."""

    def release(self, layer: nn.Module) -> None:
        """Move the parameters of ``layer`` back to the meta device."""


@dataclass
class _LayerCall:
    """How the model called one decoder layer: positional args after the hidden states, and kwargs."""

    args: tuple
    kwargs: dict[str, Any]


def _capture_layer_calls(model: nn.Module, layers: nn.ModuleList, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[_LayerCall]]:
    """Hidden states entering layer 0 and the extra args/kwargs of every layer, for one id chunk.

    Each layer's forward is temporarily replaced by a recorder that passes the hidden states through
    unchanged (so masks and position embeddings are seen exactly as the model builds them, per layer,
    e.g. sliding vs full attention) and the last layer stops the forward.
    """
    hidden: list[torch.Tensor] = []
    calls: list[_LayerCall | None] = [None] * len(layers)

    def make_recorder(index: int):
        def recorder(*args: Any, **kwargs: Any) -> torch.Tensor:
            if args:
                states, rest = args[0], tuple(args[1:])
            else:
                states, rest = kwargs.pop("hidden_states"), ()
            calls[index] = _LayerCall(rest, kwargs)
            if index == 0:
                hidden.append(states)
            if index == len(layers) - 1:
                raise _StopForward
            return states

        return recorder

    for index, layer in enumerate(layers):
        layer.forward = make_recorder(index)  # instance attribute shadows the class method
    try:
        model(input_ids=input_ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        for layer in layers:
            del layer.forward
    missing = [i for i, call in enumerate(calls) if call is None]
    if not hidden or missing:
        raise ValueError(f"{type(model).__name__}: decoder layers {missing or [0]} were not called by the forward pass")
    return hidden[0], calls  # type: ignore[return-value]


def _run_layer(layer: nn.Module, states: torch.Tensor, call: _LayerCall) -> torch.Tensor:
    out = layer(states, *call.args, **call.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _sequential_groups(
    layer: nn.Module, linears: dict[str, nn.Linear], states: torch.Tensor, call: _LayerCall
) -> list[list[str]]:
    """Linears of one layer in call order, grouped when consecutive ones read the same input tensor.

    For a Llama/Qwen layer: [q, k, v], [o], [gate, up], [down] (the reference "true sequential" order).
    Linears never called by the probe forward come last, together.
    """
    calls: list[tuple[str, torch.Tensor]] = []  # inputs are kept alive so their ids stay unique

    def make_hook(name: str):
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            calls.append((name, args[0] if args else kwargs["input"]))

        return hook

    handles = [module.register_forward_pre_hook(make_hook(name), with_kwargs=True) for name, module in linears.items()]
    try:
        _run_layer(layer, states, call)
    finally:
        for handle in handles:
            handle.remove()
    groups: list[list[str]] = []
    seen: set[str] = set()
    previous_input: torch.Tensor | None = None
    for name, inputs in calls:
        if name in seen:
            continue
        seen.add(name)
        if groups and inputs is previous_input:
            groups[-1].append(name)
        else:
            groups.append([name])
        previous_input = inputs
    never_called = [name for name in linears if name not in seen]
    if never_called:
        groups.append(never_called)
    return groups


def _collect_hessians(
    layer: nn.Module,
    linears: dict[str, nn.Linear],
    states: list[torch.Tensor],
    calls: list[_LayerCall],
) -> dict[str, HessianAccumulator]:
    """Hessians of ``linears`` over all calibration chunks.

    Each forward stops once every Linear of the group has seen its input (a Linear called twice in
    one layer forward would only count its first call).
    """
    accumulators = {name: HessianAccumulator(module.in_features, name=name) for name, module in linears.items()}
    pending: set[str] = set()

    def make_hook(name: str):
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            accumulators[name].add_batch(args[0] if args else kwargs["input"])
            pending.discard(name)
            if not pending:
                raise _StopForward

        return hook

    handles = [module.register_forward_pre_hook(make_hook(name), with_kwargs=True) for name, module in linears.items()]
    try:
        for chunk_states, call in zip(states, calls):
            pending.update(linears)
            try:
                _run_layer(layer, chunk_states, call)
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return accumulators


def _resolve_bits(method: str, bits: int | None) -> int:
    if method in RTN_METHODS:
        if bits is not None and bits != RTN_METHODS[method]:
            raise ValueError(f"method {method!r} implies bits={RTN_METHODS[method]}, got bits={bits}")
        return RTN_METHODS[method]
    if method == "rtn":
        if bits is None:
            raise ValueError("method 'rtn' needs bits")
        return bits
    if method == "gptq":
        return 4 if bits is None else bits
    raise ValueError(f"unknown method {method!r}; expected one of {sorted(RTN_METHODS) + ['rtn', 'gptq']}")


def quantize_model(
    model: nn.Module,
    method: str,
    calibration_input_ids: torch.Tensor | Sequence[torch.Tensor] | None = None,
    *,
    bits: int | None = None,
    group_size: int = -1,
    symmetric: bool = True,
    skip: Sequence[str] = DEFAULT_SKIP,
    act_order: bool = False,
    static_groups: bool = False,
    damp_percent: float = 0.01,
    block_size: int = 128,
    true_sequential: bool = True,
    calibration_batch_size: int = 8,
    progress: bool = True,
    layer_weights: LayerWeights | None = None,
) -> dict[str, QuantizedLinear]:
    """Quantize every ``nn.Linear`` of a HF causal LM not matched by ``skip``; returns codes by module name.

    ``method``: ``"int8"``, ``"int4"``, ``"int2"`` (RTN with those bits), ``"rtn"`` (RTN, ``bits`` given)
    or ``"gptq"`` (``bits`` defaults to 4; needs ``calibration_input_ids``, ``[n, seq]`` token ids or a
    list of sequences).  The model's weights are left as they were on return.

    GPTQ runs layer by layer, as in the paper: the inputs to decoder layer 0 are captured for the
    calibration batch; in each layer the Linears are processed in "true sequential" groups (those
    reading the same input together: q/k/v, then o, then gate/up, then down), each group's Hessians
    collected with the layer's earlier groups already quantized (``true_sequential=False``: all
    Linears of the layer from the float layer at once).  The layer's outputs, computed with its
    dequantized weights, feed the next layer; then its original weights are restored.

    ``layer_weights`` (GPTQ only): the decoder layers of ``model`` hold no weights (the meta device) and
    each is loaded through it before its turn and released after, so one layer is resident at a time;
    the weights outside the layers (embeddings) are released once layer 0's inputs are captured.
    """
    resolved_bits = _resolve_bits(method, bits)
    _check_bits(resolved_bits)
    _check_group_size(group_size)
    linears = find_quantizable_linears(model, skip)
    if not linears:
        raise ValueError(f"{type(model).__name__}: no nn.Linear left to quantize after skip={tuple(skip)}")
    if method != "gptq":
        return _quantize_model_rtn(linears, resolved_bits, group_size, symmetric, progress)
    if calibration_input_ids is None:
        raise ValueError("method 'gptq' needs calibration_input_ids")
    options = dict(
        bits=resolved_bits, group_size=group_size, symmetric=symmetric, damp_percent=damp_percent,
        block_size=block_size, act_order=act_order, static_groups=static_groups,
    )
    chunks = _calibration_chunks(calibration_input_ids, calibration_batch_size)
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab_size is not None:
        for chunk in chunks:
            if int(chunk.min()) < 0 or int(chunk.max()) >= vocab_size:
                raise ValueError(f"calibration_input_ids: token ids must lie in [0, {vocab_size})")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return _quantize_model_gptq(model, linears, chunks, options, true_sequential, progress, layer_weights)
    finally:
        model.train(was_training)


def _quantize_model_rtn(
    linears: dict[str, nn.Linear], bits: int, group_size: int, symmetric: bool, progress: bool
) -> dict[str, QuantizedLinear]:
    return {
        name: quantize_rtn(module.weight, bits, group_size, symmetric, name=name)
        for name, module in tqdm(linears.items(), desc=f"RTN int{bits}", disable=not progress)
    }


def _quantize_model_gptq(
    model: nn.Module,
    linears: dict[str, nn.Linear],
    chunks: list[torch.Tensor],
    options: dict[str, Any],
    true_sequential: bool,
    progress: bool,
    layer_weights: LayerWeights | None,
) -> dict[str, QuantizedLinear]:
    prefix, layers = find_decoder_layers(model)
    per_layer: list[dict[str, nn.Linear]] = [
        {name: m for name, m in linears.items() if name.startswith(f"{prefix}.{index}.")} for index in range(len(layers))
    ]
    outside = sorted(set(linears) - {name for group in per_layer for name in group})
    if outside:
        raise ValueError(
            f"GPTQ quantizes Linears inside {prefix}.* only; add these to skip or use RTN: {outside}"
        )

    captured = [_capture_layer_calls(model, layers, chunk) for chunk in chunks]
    states = [hidden for hidden, _ in captured]
    if layer_weights is not None:
        layer_weights.release(model)  # the embeddings are not needed past layer 0's inputs
    results: dict[str, QuantizedLinear] = {}
    with tqdm(range(len(layers)), desc=f"GPTQ int{options['bits']}", disable=not progress) as bar:
        for index in bar:
            layer, targets = layers[index], per_layer[index]
            calls = [layer_calls[index] for _, layer_calls in captured]
            if layer_weights is not None:
                layer_weights.load(f"{prefix}.{index}", layer)
                originals = {}
            else:
                originals = {name: module.weight.detach().clone() for name, module in targets.items()}
            try:
                if targets:
                    bar.set_postfix_str(f"{len(targets)} linears")
                    results.update(_quantize_layer(layer, targets, states, calls, options, true_sequential))
                # The next layer sees this one's output with its quantized weights, as in GPTQ.
                states = [_run_layer(layer, chunk_states, call) for chunk_states, call in zip(states, calls)]
            finally:
                if layer_weights is not None:
                    layer_weights.release(layer)
                for name, module in targets.items():
                    if name in originals:
                        module.weight.data.copy_(originals[name])
    return results


def _quantize_layer(
    layer: nn.Module,
    targets: dict[str, nn.Linear],
    states: list[torch.Tensor],
    calls: list[_LayerCall],
    options: dict[str, Any],
    true_sequential: bool,
) -> dict[str, QuantizedLinear]:
    """GPTQ every target Linear of one decoder layer, writing dequantized weights into the layer as it goes."""
    groups = _sequential_groups(layer, targets, states[0], calls[0]) if true_sequential else [list(targets)]
    results: dict[str, QuantizedLinear] = {}
    for group in groups:
        group_linears = {name: targets[name] for name in group}
        accumulators = _collect_hessians(layer, group_linears, states, calls)
        for name, module in group_linears.items():
            if accumulators[name].n_samples == 0:
                warnings.warn(f"{name}: no calibration activations reached it; GPTQ with H = 0 (same codes as RTN)")
            result = run_gptq(module.weight, accumulators[name].hessian, name=name, **options)
            results[name] = result.quantized
            module.weight.data.copy_(result.dequantized.to(module.weight.dtype))
    return results


def fake_quantize_model(model: nn.Module, results: dict[str, QuantizedLinear], inplace: bool = False) -> nn.Module:
    """A copy of ``model`` (or ``model`` itself with ``inplace``) whose quantized Linears hold dequantized weights."""
    modules = dict(model.named_modules())
    for name, quantized in results.items():
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            raise ValueError(f"{name}: not an nn.Linear of {type(model).__name__}")
        if tuple(module.weight.shape) != (quantized.out_features, quantized.in_features):
            raise ValueError(
                f"{name}: quantized shape {(quantized.out_features, quantized.in_features)} "
                f"!= weight shape {tuple(module.weight.shape)}"
            )
    target = model if inplace else copy.deepcopy(model)
    with torch.no_grad():
        for name, module in target.named_modules():
            if name in results:
                module.weight.data.copy_(results[name].dequantize(module.weight.dtype))
    return target
