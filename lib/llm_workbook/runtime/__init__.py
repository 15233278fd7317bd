"""Models from the store: transformers models built from a Parquet file, activation fake-quantization,
and the packed Linear that keeps codes packed at run time."""
