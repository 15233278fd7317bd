"""The compressed-tensors family's base: what the ``fp8``, ``int8``, ``packed`` and ``nvfp4`` formats share.

compressed-tensors keeps this in ``BaseQuantizationCompressor``; here it is the config side (config groups,
targets and ignore lists, the scheme of one module, activation kinds), the layout checks (dtypes, scale and
zero-point grids per tensor / channel / group / block, ``g_idx``), the grids' expansion to ``[out, in]``, and the
one affine dequantization ``(q - zero_point) * scale`` the int and float formats both use.
Not a registered format: it never claims a checkpoint.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from llm_workbook.schema import dtype_code
from llm_workbook.formats.base import AffineWeight, QuantizedTensor, Row, StoreError, UnsupportedFormatError, entry_matches

CT_METHOD = "compressed-tensors"
FLOAT_CODES = {"F32", "BF16", "F16"}
FP8_CODES = {"F8_E4M3", "F8_E5M2"}
INT_CODES = {"I8", "I16", "I32", "I64", "U8"}
STRATEGIES = ("tensor", "channel", "group", "block")


def _is_class_target(target: str) -> bool:
    # compressed-tensors targets are module names, "re:" regexes or class names such as "Linear"
    return not target.startswith("re:") and "." not in target and target[:1].isupper()


def ct_groups(qconfig: dict | None) -> list[dict]:
    """The config groups of a compressed-tensors config, each with its effective ``format``.

    Empty for anything that is not a usable compressed-tensors config.
    """
    if not isinstance(qconfig, dict) or qconfig.get("quant_method") != CT_METHOD:
        return []
    groups = qconfig.get("config_groups")
    if not isinstance(groups, dict):
        return []
    default_format = qconfig.get("format") or "naive-quantized"
    out = []
    for name, group in groups.items():
        if not isinstance(group, dict):
            return []
        out.append({**group, "name": name, "format": group.get("format") or default_format})
    return out


def ct_has_sparsity(qconfig: dict | None) -> bool:
    """A compressed-tensors sparsity compressor rewrites the weights into other tensors: not ours."""
    sparsity = (qconfig or {}).get("sparsity_config")
    return isinstance(sparsity, dict) and sparsity.get("format") not in (None, "dense")


def ct_detect(qconfig: dict | None, formats: set[str], accepts: Callable[[dict], bool]) -> bool:
    """True when every weight-quantizing group of a compressed-tensors config has one of ``formats``
    and weight args that ``accepts`` (activation-only groups are ignored)."""
    if ct_has_sparsity(qconfig):
        return False
    weighted = [g for g in ct_groups(qconfig) if isinstance(g.get("weights"), dict)]
    return bool(weighted) and all(g["format"] in formats and accepts(weight_args(g["weights"])) for g in weighted)


def weight_args(raw: dict) -> dict[str, Any]:
    """compressed-tensors QuantizationArgs as a plain dict, with the strategy inferred as its validator does."""
    strategy = raw.get("strategy")
    group_size = raw.get("group_size")
    if strategy is None:
        if group_size is None:
            strategy = "tensor"
        elif group_size == -1:
            strategy = "channel"
        else:
            strategy = "group"
    block = raw.get("block_structure")
    return {
        "num_bits": int(raw.get("num_bits", 8)),
        "type": raw.get("type", "int"),
        "symmetric": bool(raw.get("symmetric", True)),
        "strategy": strategy,
        "group_size": group_size if strategy in ("group", "tensor_group") else None,
        "block_size": [int(b) for b in block] if block else None,
        "dynamic": raw.get("dynamic", False),
        "actorder": raw.get("actorder"),
    }


def ct_group_and_weight_args(qconfig: dict, module: str) -> tuple[dict, dict]:
    """The compressed-tensors config group targeting ``module`` and its weight args; an error if none does."""
    group = ct_scheme_for(qconfig, module)
    if group is None:
        raise StoreError(f"{module}: no config group of the quantization_config targets this module")
    return group, weight_args(group["weights"])


def ct_scheme_for(qconfig: dict | None, module: str) -> dict | None:
    """The config group whose targets cover ``module`` (names and regexes before class names), or None."""
    by_class = None
    for group in ct_groups(qconfig):
        if not isinstance(group.get("weights"), dict):
            continue
        for target in group.get("targets") or []:
            if _is_class_target(target):
                by_class = by_class or group
            elif entry_matches(target, module) if target.startswith("re:") else target == module:
                return group
    return by_class


def activation_kind(group: dict | None) -> str | None:
    """'static', 'dynamic' or None (no activation quantization) for a compressed-tensors group."""
    acts = (group or {}).get("input_activations")
    if not isinstance(acts, dict):
        return None
    return "static" if acts.get("dynamic") in (False, None) else "dynamic"


def code_of(name: str, tensor: torch.Tensor) -> str:
    try:
        return dtype_code(tensor.dtype)
    except ValueError as exc:
        raise StoreError(f"{name}: {exc}") from None


def require_dtype(name: str, tensor: torch.Tensor, allowed: set[str]) -> str:
    """The tensor's dtype code; StoreError naming the tensor when it is not one of ``allowed``."""
    code = code_of(name, tensor)
    if code not in allowed:
        raise StoreError(f"tensor {name!r} has dtype {code}, expected one of {sorted(allowed)}")
    return code


def require_scalar(name: str, tensor: torch.Tensor, allowed: set[str] = FLOAT_CODES) -> None:
    require_dtype(name, tensor, allowed)
    if tensor.numel() != 1:
        raise StoreError(f"tensor {name!r} must hold one value, has shape {list(tensor.shape)}")


def scale_grid(layout: dict, out: int, in_: int) -> tuple[int, int]:
    """Rows x columns of the scale grid of a [out, in] weight for a layout (strategy, group/block size)."""
    strategy = layout["strategy"]
    if strategy == "tensor":
        return 1, 1
    if strategy == "channel":
        return out, 1
    if strategy in ("group", "tensor_group"):
        return out, math.ceil(in_ / layout["group_size"])
    if strategy == "block":
        b0, b1 = layout["block_size"]
        return math.ceil(out / b0), math.ceil(in_ / b1)
    raise UnsupportedFormatError(f"unsupported weight quantization strategy {strategy!r}; supported: {list(STRATEGIES)}")


def check_grid_shape(name: str, tensor: torch.Tensor, layout: dict, out: int, in_: int) -> None:
    """A scale / zero-point tensor must match the scale grid; singleton dimensions may be squeezed
    (per-tensor [1] or [], per-channel [out], AngelSlim's squeezed one-row/one-column block scales)."""
    rows, cols = scale_grid(layout, out, in_)
    squeezed = [d for d in tensor.shape if d != 1]
    if squeezed != [d for d in (rows, cols) if d != 1] or tensor.dim() > 2:
        raise StoreError(
            f"tensor {name!r} has shape {list(tensor.shape)}, expected [{rows}, {cols}] for a "
            f"{layout['strategy']} layout of a [{out}, {in_}] weight"
        )


def check_layout_args(module: str, layout: dict, in_: int) -> None:
    strategy = layout["strategy"]
    if strategy not in STRATEGIES and strategy != "tensor_group":
        raise UnsupportedFormatError(f"{module}: unsupported weight quantization strategy {strategy!r}")
    if strategy in ("group", "tensor_group"):
        gs = layout.get("group_size")
        if not isinstance(gs, int) or gs <= 0:
            raise StoreError(f"{module}: group strategy needs a positive group_size, got {gs!r}")
    if strategy == "block":
        block = layout.get("block_size")
        if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            raise StoreError(f"{module}: block strategy needs a block size [rows, cols], got {block!r}")


def check_g_idx(name: str, g_idx: torch.Tensor, layout: dict, out: int, in_: int) -> None:
    if layout["strategy"] != "group":
        raise StoreError(f"tensor {name!r}: a group index only exists for the group strategy, not {layout['strategy']!r}")
    require_dtype(name, g_idx, {"I32", "I64"})
    if list(g_idx.shape) != [in_]:
        raise StoreError(f"tensor {name!r} has shape {list(g_idx.shape)}, expected [{in_}]")
    groups = scale_grid(layout, out, in_)[1]
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
        raise StoreError(f"tensor {name!r} holds group indices outside [0, {groups})")


def check_ct_extras(module: str, tensors: dict, layout: dict, out: int, in_: int, symmetric: bool,
                    zero_point_codes: set[str] | None) -> None:
    """The optional tensors of a compressed-tensors Linear: zero point (unpacked, of ``zero_point_codes``;
    None when the caller checked it), ``weight_g_idx`` and ``input_scale``."""
    zp_name = f"{module}.weight_zero_point"
    if "weight_zero_point" in tensors:
        if symmetric:
            raise StoreError(f"tensor {zp_name!r} present but the scheme is symmetric")
        if zero_point_codes is not None:
            require_dtype(zp_name, tensors["weight_zero_point"], zero_point_codes)
            check_grid_shape(zp_name, tensors["weight_zero_point"], layout, out, in_)
    elif not symmetric:
        raise StoreError(f"{module}: asymmetric scheme but no tensor {zp_name!r}")
    if "weight_g_idx" in tensors:
        check_g_idx(f"{module}.weight_g_idx", tensors["weight_g_idx"], layout, out, in_)
    if "input_scale" in tensors:
        require_scalar(f"{module}.input_scale", tensors["input_scale"])


def expand_grid(values: torch.Tensor, layout: dict, out: int, in_: int, g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Per-element view of a scale / zero-point grid, broadcastable to [out, in] (float32)."""
    rows, cols = scale_grid(layout, out, in_)
    grid = values.to(torch.float32).reshape(rows, cols)
    strategy = layout["strategy"]
    if strategy in ("tensor", "channel"):
        return grid
    if strategy in ("group", "tensor_group"):
        columns = g_idx.long() if g_idx is not None else torch.arange(in_) // layout["group_size"]
        return grid[:, columns]
    b0, b1 = layout["block_size"]
    return grid.repeat_interleave(b0, dim=0)[:out].repeat_interleave(b1, dim=1)[:, :in_]


def per_row_grid(values: torch.Tensor, layout: dict, out: int, in_: int,
                 g_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A scale / zero-point grid as ``[out, G]`` float32 with each input column's group, for
    ``AffineWeight``; None for block layouts (their groups span rows)."""
    rows, cols = scale_grid(layout, out, in_)
    grid = values.to(torch.float32).reshape(rows, cols)
    strategy = layout["strategy"]
    if strategy in ("tensor", "channel"):
        return grid.expand(out, 1).contiguous(), torch.zeros(in_, dtype=torch.long)
    if strategy in ("group", "tensor_group"):
        return grid, (g_idx.long() if g_idx is not None else torch.arange(in_) // layout["group_size"])
    return None


def ct_affine(record: QuantizedTensor, codes: torch.Tensor, zeros: torch.Tensor | float, bits: int) -> AffineWeight | None:
    """The ``AffineWeight`` of a compressed-tensors integer layer from its codes and zero points (a grid
    like the scales', or one number)."""
    out, in_ = record_shape(record)
    g_idx = record.tensors.get("weight_g_idx")
    scales = per_row_grid(record.tensors["weight_scale"], record.params, out, in_, g_idx)
    if scales is None:
        return None
    scales, groups = scales
    if isinstance(zeros, torch.Tensor):
        zeros = per_row_grid(zeros, record.params, out, in_, g_idx)[0]
    else:
        zeros = torch.full_like(scales, float(zeros))
    return AffineWeight(codes.to(torch.int32), scales, zeros, groups, bits)


def record_shape(record: QuantizedTensor) -> tuple[int, int]:
    shape = record.params.get("weight_shape")
    if not (isinstance(shape, list) and len(shape) == 2):
        raise StoreError(f"{record.layer_name}: record has no valid weight_shape parameter ({shape!r})")
    return int(shape[0]), int(shape[1])


def require_members(module: str, tensors: dict[str, torch.Tensor], needed: tuple[str, ...]) -> None:
    missing = [s for s in needed if s not in tensors]
    if missing:
        raise StoreError(f"{module}: quantized group lacks tensor(s) {[f'{module}.{s}' for s in missing]}")


def rows_for(module: str, tensors: dict[str, torch.Tensor], fmt: str, params: dict) -> list[Row]:
    """One row per source tensor, unchanged, all sharing the group's params."""
    return [Row(f"{module}.{suffix}" if module else suffix, tensor, fmt, dict(params)) for suffix, tensor in tensors.items()]


def affine_dequantize(record: QuantizedTensor, scale_name: str = "weight_scale",
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(q - zero_point) * scale`` in float32, scale and zero point broadcast per tensor / channel / group /
    block (``scale_name``: ``weight_scale``, or ``weight_scale_inv``, a multiplier despite its name)."""
    out, in_ = record_shape(record)
    weight = record.tensors["weight"]
    if tuple(weight.shape) != (out, in_):
        raise StoreError(f"{record.layer_name}.weight: shape {list(weight.shape)} != weight_shape {[out, in_]}")
    g_idx = record.tensors.get("weight_g_idx")
    values = weight.to(torch.float32)
    if "weight_zero_point" in record.tensors:
        values = values - expand_grid(record.tensors["weight_zero_point"], record.params, out, in_, g_idx)
    return (values * expand_grid(record.tensors[scale_name], record.params, out, in_, g_idx)).to(dtype)

