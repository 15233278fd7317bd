"""AI-OS's ``llm_compression.inference.weight_loader``: ``WeightLoader`` and ``LazyWeightDict`` with
AI-OS's names, arguments and return values, reading every file ``WeightLoaderV2`` reads (AI-OS's V1/V2
as their writer meant them, and ours).

Where we differ from AI-OS on purpose: int2 rows AI-OS wrote are unpacked in the order its writer
packed them; a fp16 row is read as float16 whatever its dtype tag; bf16 is read as bf16 (and upcast
with ``force_float32``, like float16); a quant_type AI-OS does not define is an error, not int8; and
every read of our files is checksum-verified.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from llm_workbook import schema as S
from llm_workbook.logger import logger
from llm_workbook.store import inventory
from llm_workbook.store.loader import WeightLoaderV2


class WeightLoader:
    """Tensors by full name, as float32 (quantized ones dequantized), cached unless ``cache_weights=False``.

    >>> loader = WeightLoader("weights.parquet")
    >>> layer = loader.get_layer("model.layers.0.self_attn.q_proj.weight")
    """

    def __init__(self, parquet_path: str, use_memory_map: bool = True, device: str = "cpu",
                 cache_weights: bool = True, force_float32: bool = True):
        self.parquet_path = Path(parquet_path)
        self.use_memory_map = use_memory_map  # our reads always map local files
        self.device = device
        self.cache_weights = cache_weights
        self.force_float32 = force_float32
        if not self.parquet_path.exists():
            raise FileNotFoundError(f"Parquet file not found: {parquet_path}")
        self._weight_cache: Dict[str, torch.Tensor] = {}
        self._loader: Optional[WeightLoaderV2] = None
        self._metadata: Optional[Dict[str, Any]] = None

    @property
    def store(self) -> WeightLoaderV2:
        """The underlying ``WeightLoaderV2`` (opened on first use, as AI-OS opens its table)."""
        if self._loader is None:
            self._loader = WeightLoaderV2(self.parquet_path)
        return self._loader

    def _tensor(self, name: str) -> torch.Tensor:
        loader = self.store
        if name not in loader.rows and name not in set(loader.keys()):
            raise KeyError(f"Layer '{name}' not found in weights.")
        layer, weight = S.split_name(name)
        tensor = loader.load_weight(layer, weight)
        if self.force_float32 and tensor.dtype in (torch.float16, torch.bfloat16):
            tensor = tensor.float()
        return tensor.to(self.device) if self.device != "cpu" else tensor

    def load_weights(self) -> Dict[str, torch.Tensor]:
        start = time.time()
        weights = {name: self.get_layer(name) for name in self.get_layer_names()}
        logger.info(f"Loaded {len(weights)} layers in {(time.time() - start) * 1000:.2f}ms")
        return weights

    def get_layer(self, layer_name: str) -> torch.Tensor:
        if self.cache_weights and layer_name in self._weight_cache:
            return self._weight_cache[layer_name]
        tensor = self._tensor(layer_name)
        if self.cache_weights:
            self._weight_cache[layer_name] = tensor
        return tensor

    def get_layer_names(self) -> List[str]:
        """The model's parameter names (for quantized groups of our files, the dequantized weight's name)."""
        return list(self.store.keys())

    def get_metadata(self) -> Dict[str, Any]:
        """AI-OS's summary: ``num_layers``, ``total_parameters``, ``dtypes``, ``layer_shapes``, ``layer_dtypes``
        (the weight's dtype before quantization), ``schema_version``."""
        if self._metadata is None:
            entries = inventory.entries(self.store)
            dtypes = {e.name: _dtype_name(self.store, e) for e in entries}
            self._metadata = {
                "num_layers": len(entries),
                "total_parameters": sum(e.numel for e in entries),
                "dtypes": sorted(set(dtypes.values())),
                "layer_shapes": {e.name: list(e.shape) for e in entries},
                "layer_dtypes": dtypes,
                "schema_version": self.get_schema_version(),
            }
        return self._metadata

    def get_schema_version(self) -> int:
        """1 for AI-OS V1 files, 2 for V2 files and ours (V2 extended)."""
        return 1 if self.store.version is S.SchemaVersion.AIOS_V1 else 2

    def clear_cache(self) -> None:
        self._weight_cache.clear()

    def unload_layer(self, layer_name: str) -> bool:
        return self._weight_cache.pop(layer_name, None) is not None

    def unload_layers(self, layer_names: List[str]) -> int:
        return sum(self.unload_layer(name) for name in layer_names)

    def get_cached_layers(self) -> List[str]:
        return list(self._weight_cache)

    def get_cache_size_mb(self) -> float:
        return sum(t.numel() * t.element_size() for t in self._weight_cache.values()) / (1024 * 1024)

    def __repr__(self) -> str:
        meta = self.get_metadata() if self._loader is not None else {}
        params = meta.get("total_parameters", "?")
        return (f"WeightLoader(path={self.parquet_path.name}, layers={meta.get('num_layers', '?')}, "
                f"params={f'{params:,}' if isinstance(params, int) else params}, cache={self.get_cache_size_mb():.1f}MB)")


def _dtype_name(loader: WeightLoaderV2, entry: inventory.Entry) -> str:
    info = loader.rows.get(entry.name)
    if info is not None and "dtype_tag" in info.params:  # an AI-OS file's own tag (bf16 models: float32 bytes)
        return info.params["dtype_tag"]
    code = (info.params.get("original_dtype") or info.dtype) if info is not None else None
    return S.dtype_name(code) if code in S.DTYPE_CODES else "torch.float32"  # a dequantized weight


class LazyWeightDict:
    """A read-only mapping that loads each tensor from a ``WeightLoader`` when first asked for."""

    def __init__(self, loader: WeightLoader):
        self.loader = loader
        self._layer_names = loader.get_layer_names()
        self._names = set(self._layer_names)
        self._cache: Dict[str, torch.Tensor] = {}

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._cache:
            self._cache[key] = self.loader.get_layer(key)
        return self._cache[key]

    def __contains__(self, key: object) -> bool:
        return key in self._names

    def get(self, key: str, default=None):
        try:
            return self[key]
        except KeyError:
            return default

    def keys(self):
        return self._layer_names

    def __len__(self) -> int:
        return len(self._layer_names)

    def __iter__(self):
        return iter(self._layer_names)

    def values(self):
        return (self.loader.get_layer(name) for name in self._layer_names)

    def items(self):
        return ((name, self.loader.get_layer(name)) for name in self._layer_names)


__all__ = ["LazyWeightDict", "WeightLoader"]
