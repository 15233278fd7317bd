"""The Parquet weight store: checkpoint sources (HF directory, hub, GGUF), the writer, conversion and
export, and the lazy loader (``WeightLoaderV2``)."""
