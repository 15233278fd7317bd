"""``llm_compression.inference``: AI-OS's module paths for ``llm_workbook.inference``."""
