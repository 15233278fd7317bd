"""AI-OS's API (``llm_compression.inference.*``) as the workbook implements it; importable under AI-OS's
paths through ``lib/llm_workbook_aios_api`` when AI-OS itself is not installed."""
