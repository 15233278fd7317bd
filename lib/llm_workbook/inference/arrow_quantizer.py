"""AI-OS's ``llm_compression.inference.arrow_quantizer``: ``QuantizationConfig`` and ``ArrowQuantizer``
with AI-OS's names, checks and results (codes, scales and zero points equal to AI-OS's, byte for byte).

Where we differ from AI-OS on purpose: the output is our file (AI-OS's V2 columns plus ours, with the
input's config and tokenizer), which AI-OS's own loader reads right: int2 codes are packed in the order
its loader unpacks them, and mixed-precision rows are tagged float16, not with the source's dtype. The
input may be any file ``WeightLoaderV2`` reads; its tensors are quantized from their float32 values.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional

from llm_workbook.paths import __version__
from llm_workbook import schema as S
from llm_workbook.errors import ConfigurationError, StorageError, StoreError
from llm_workbook.formats.base import Row
from llm_workbook.logger import logger
from llm_workbook.quantize import aios as aios_quantize
from llm_workbook.store.writer import StoreWriter
from llm_workbook.store.loader import WeightLoaderV2

QUANT_TYPES = ("int8", "int2", "fp16")
METHODS = ("ptq", "gptq")


@dataclass
class QuantizationConfig:
    """``quant_type`` int8 | int2 | fp16, ``calibration_method`` ptq | gptq, ``per_channel``, ``symmetric``,
    ``group_size`` (0: none; int2 without per_channel gets 128), ``mixed_precision_layers`` (name
    substrings kept as float16)."""

    quant_type: Literal["int8", "int2", "fp16"] = "int8"
    calibration_method: Literal["ptq", "gptq"] = "ptq"
    per_channel: bool = True
    symmetric: bool = True
    group_size: int = 0
    mixed_precision_layers: Optional[List[str]] = field(default_factory=lambda: None)

    def __post_init__(self):
        if self.quant_type not in QUANT_TYPES:
            raise ConfigurationError(f"Invalid quant_type: {self.quant_type}", config_key="quant_type",
                                     config_value=self.quant_type, expected_type="'int8', 'int2', or 'fp16'")
        if self.calibration_method not in METHODS:
            raise ConfigurationError(f"Invalid calibration_method: {self.calibration_method}",
                                     config_key="calibration_method", config_value=self.calibration_method,
                                     expected_type="'ptq' or 'gptq'")
        for key in ("per_channel", "symmetric"):
            value = getattr(self, key)
            if not isinstance(value, bool):
                raise ConfigurationError(f"{key} must be bool, got {type(value)}", config_key=key, config_value=value,
                                         expected_type="bool")
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < 0:
            raise ConfigurationError(f"group_size must be non-negative int, got {self.group_size}",
                                     config_key="group_size", config_value=self.group_size, expected_type="int >= 0")
        if self.quant_type == "int2" and self.group_size == 0 and not self.per_channel:
            self.group_size = 128
        if self.mixed_precision_layers is not None:
            if not isinstance(self.mixed_precision_layers, list):
                raise ConfigurationError(f"mixed_precision_layers must be list, got {type(self.mixed_precision_layers)}",
                                         config_key="mixed_precision_layers", config_value=self.mixed_precision_layers,
                                         expected_type="list")
            for pattern in self.mixed_precision_layers:
                if not isinstance(pattern, str):
                    raise ConfigurationError(f"mixed_precision_layers must contain strings, got {type(pattern)}",
                                             config_key="mixed_precision_layers", config_value=pattern,
                                             expected_type="str")


class ArrowQuantizer:
    """AI-OS's PTQ of a weight file: every float tensor to int8/int2 codes (or float16 for ``quant_type='fp16'``
    and the ``mixed_precision_layers``)."""

    def __init__(self, config: QuantizationConfig):
        self.config = config

    def quantize_model(self, input_parquet: str, output_parquet: str, calibration_data: Any = None,
                       show_progress: bool = True) -> None:
        """Quantize ``input_parquet`` into ``output_parquet``; StorageError if either side fails (no partial output)."""
        from tqdm.auto import tqdm

        start = time.time()
        if not Path(input_parquet).exists():
            raise StorageError(f"Input Parquet file not found: {input_parquet}", operation="read", path=str(input_parquet))
        try:
            loader = WeightLoaderV2(input_parquet)
        except StoreError as exc:
            raise StorageError(f"Failed to read input Parquet: {exc}", operation="read", path=str(input_parquet),
                               original_exception=exc) from None
        current = "(none)"
        try:
            with StoreWriter(output_parquet) as writer:
                for name in tqdm(loader.keys(), desc="quantize (AI-OS PTQ)", unit="tensor", disable=not show_progress):
                    current = name
                    writer.write(self._row(loader, name, calibration_data))
                writer.commit(self._metadata(loader, input_parquet))
        except (StoreError, OSError) as exc:
            raise StorageError(f"Failed to write output Parquet at tensor {current!r}: {exc}", operation="write",
                               path=str(output_parquet), original_exception=exc) from None
        logger.info(f"Quantized {len(loader.keys())} tensors in {time.time() - start:.2f}s -> {output_parquet}")

    def _row(self, loader: WeightLoaderV2, name: str, calibration_data: Any) -> Row:
        calibration = None
        if self.config.calibration_method == "gptq":
            calibration = _calibration_for(calibration_data, name)
            if calibration is None:
                logger.warning(f"No calibration data for {name}: PTQ instead of GPTQ.")
        c = self.config
        return aios_quantize.tensor_row(loader, name, c.quant_type, c.per_channel, c.symmetric, c.group_size,
                                        keep_float=self._keep_float(name), calibration=calibration)

    def _keep_float(self, name: str) -> bool:
        return any(pattern in name for pattern in self.config.mixed_precision_layers or [])

    def _metadata(self, loader: WeightLoaderV2, source: str) -> dict[str, str]:
        meta = {key: value for key, value in loader.metadata.items()
                if key in (S.META_CONFIG, S.META_GENERATION_CONFIG, S.META_FILES)}
        meta[S.META_SOURCE] = json.dumps({"source": str(source), "quantizer": "aios-arrowquantizer",
                                          "config": self.config.__dict__, "llmc_version": __version__})
        return meta


def _calibration_for(calibration_data: Any, name: str):
    """AI-OS's lookup: a dict by tensor name, then by the name without ``.weight``; anything else as it is."""
    if isinstance(calibration_data, dict):
        found = calibration_data.get(name)
        return found if found is not None else calibration_data.get(name.rsplit(".weight", 1)[0])
    return calibration_data


__all__ = ["ArrowQuantizer", "QuantizationConfig"]
