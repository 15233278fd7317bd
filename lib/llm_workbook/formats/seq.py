"""AngelSlim's SEQ 2-bit QAT weights (HY-1.8B-2Bit): the weight a served model computes with.

Not a storage format of its own. The release is float32 safetensors without a quantization_config; every
q/k/v/o/gate/up/down projection ``<module>.weight`` has a companion ``<module>.weight_clip_val`` of shape
``[out, 1]``, the SEQ scale α of each output row. AngelSlim's quantizer (``compressor/qat/modules/
special_quantizer.py``) serves ``α · q`` with ``q = (round(2 · clamp(w / α, -0.99, 0.99) - 0.5) + 0.5) / 2``,
four levels ``α · {-3/4, -1/4, 1/4, 3/4}`` per row. Whether the published weights already sit on that grid or
are the latent weights SEQ maps is not known, so both are handled:

* a row **on the grid** (SEQ gives it back bit for bit) has at most four values: the ``grid`` encoder stores its
  layer as 2-bit codes plus the row's levels, restored exactly;
* a **latent** row is stored as it is (lossless) and served with SEQ applied (``served``), never as the latent
  weight, which is what a plain transformers load would silently do (it drops ``weight_clip_val`` as an
  unexpected key).

SEQ is idempotent on its grid, so serving always applies it; ``Survey`` says which case a file is.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from llm_workbook.formats.base import StoreError

CLIP_SUFFIX = "weight_clip_val"
WEIGHT_SUFFIX = "weight"
CLAMP = 0.99  # AngelSlim's clamp of w / α before rounding


def clip_name(weight_name: str) -> str | None:
    """The ``weight_clip_val`` companion's name of a ``<module>.weight``, or None for other names."""
    if not weight_name.endswith("." + WEIGHT_SUFFIX):
        return None
    return weight_name[: -len(WEIGHT_SUFFIX)] + CLIP_SUFFIX


def companions(names: Iterable[str]) -> dict[str, str]:
    """``{weight name: clip name}`` of every weight that has a ``weight_clip_val`` among ``names``."""
    present = set(names)
    pairs = {}
    for name in present:
        clip = clip_name(name)
        if clip and clip in present:
            pairs[name] = clip
    return pairs


def _checked_clip(weight_name: str, weight: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
    """α as a float32 column ``[out, 1]``; a malformed companion is refused with the tensor's name."""
    rows = weight.shape[0] if weight.dim() == 2 else None
    if rows is None or tuple(clip.shape) not in ((rows, 1), (rows,)):
        raise StoreError(f"{clip_name(weight_name)}: shape {tuple(clip.shape)}, SEQ needs one α per row of "
                         f"{weight_name} {tuple(weight.shape)}")
    alpha = clip.to(torch.float32).reshape(rows, 1)
    if not (torch.isfinite(alpha).all() and (alpha > 0).all()):
        raise StoreError(f"{clip_name(weight_name)}: every α must be finite and positive")
    return alpha


def seq_quantize(weight: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """AngelSlim's SEQ of ``weight`` with per-row ``alpha`` ``[out, 1]``, computed in float32."""
    ratio = torch.clamp(weight.to(torch.float32) / alpha, -CLAMP, CLAMP)
    return alpha * ((torch.round(ratio * 2 - 0.5) + 0.5) / 2)


def rows_on_grid(weight_name: str, weight: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
    """Per output row: does SEQ give the stored row back bit for bit (in the weight's own dtype)?"""
    served = seq_quantize(weight, _checked_clip(weight_name, weight, clip)).to(weight.dtype)
    return (served == weight).all(dim=1)


@dataclass
class Survey:
    """Which SEQ case a checkpoint is: projections and rows on the grid, and latent ones."""

    layers: int = 0
    layers_on_grid: int = 0
    rows: int = 0
    rows_on_grid: int = 0

    def add(self, weight_name: str, weight: torch.Tensor, clip: torch.Tensor) -> None:
        on = rows_on_grid(weight_name, weight, clip)
        self.layers += 1
        self.layers_on_grid += int(on.all())
        self.rows += on.numel()
        self.rows_on_grid += int(on.sum())

    @property
    def case(self) -> str | None:
        if not self.layers:
            return None
        if self.rows_on_grid == self.rows:
            return "on the grid"
        return "latent" if self.rows_on_grid == 0 else "mixed"

    def describe(self) -> str | None:
        """Short enough for a table cell (``llmc inspect``, the run report's store facts); None without SEQ."""
        if not self.layers:
            return None
        if self.case == "on the grid":
            return f"on the grid: {self.layers} projections, served as stored"
        return f"latent: {self.rows - self.rows_on_grid:,}/{self.rows:,} rows, served through SEQ"

    def as_dict(self) -> dict:
        return {"layers": self.layers, "layers_on_grid": self.layers_on_grid, "rows": self.rows,
                "rows_on_grid": self.rows_on_grid, "case": self.case, "description": self.describe()}


class Served(Mapping):
    """A state mapping whose SEQ weights are served as AngelSlim serves them: SEQ computed in float32 from the
    weight and α as stored (``exact``), then cast to ``dtype``; every other tensor comes from ``state``."""

    def __init__(self, state: Mapping, exact: Mapping, pairs: dict[str, str], dtype: torch.dtype | None):
        self.state, self.exact, self.pairs, self.dtype = state, exact, pairs, dtype

    def __getitem__(self, name: str) -> torch.Tensor:
        clip = self.pairs.get(name)
        if clip is None:
            return self.state[name]
        weight = self.exact[name]
        served = seq_quantize(weight, _checked_clip(name, weight, self.exact[clip]))
        return served.to(self.dtype or weight.dtype)

    def __iter__(self):
        return iter(self.state)

    def __len__(self) -> int:
        return len(self.state)

    def describe(self) -> dict:
        return {"projections": len(self.pairs),
                "description": f"AngelSlim SEQ applied to {len(self.pairs)} projections (their weight_clip_val)"}


def served(state: Mapping, exact: Mapping | None = None, dtype: torch.dtype | None = None) -> Mapping:
    """``state`` as a served model reads it: SEQ applied where a weight has a ``weight_clip_val``. ``exact``
    holds the tensors as stored (default ``state``), so that SEQ never rounds a cast copy."""
    exact = state if exact is None else exact
    pairs = {w: c for w, c in companions(exact).items() if w in state}
    return Served(state, exact, pairs, dtype) if pairs else state


__all__ = ["CLIP_SUFFIX", "Served", "Survey", "clip_name", "companions", "rows_on_grid", "seq_quantize", "served"]
