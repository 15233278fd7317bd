"""Small codec pieces several formats (and our writers and runtime) share: one definition each."""

from __future__ import annotations

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn value
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # FP4 E2M1 magnitudes by 3-bit index


def trivial_g_idx(in_features: int, group_size: int | None) -> torch.Tensor:
    """The group of each input column without act-order: ``column // group_size``; -1, 0 or None is one
    group per row (per channel)."""
    size = in_features if group_size in (-1, 0, None) else group_size
    return (torch.arange(in_features) // max(size, 1)).to(torch.int32)
