"""Old import path of the schemas (``from llm_compression.inference.quantization_schema import V2_SCHEMA``)."""

from llm_compression.schema import STORE_SCHEMA, V1_SCHEMA, V2_SCHEMA

__all__ = ["STORE_SCHEMA", "V1_SCHEMA", "V2_SCHEMA"]
