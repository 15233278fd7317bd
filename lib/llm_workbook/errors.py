"""The package's errors, in one place that imports nothing: every layer raises them, none depends on
another just to do so."""


class StoreError(ValueError):
    """Bad input or a broken file; the message names the file and the tensor."""


class SourceNotFoundError(StoreError):
    """A named model that is nowhere: no such file or directory, and not a hub id."""


class UnsupportedFormatError(StoreError):
    """A checkpoint or tensor whose quantization format we do not read."""


class QuantizeError(StoreError):
    """Bad quantize input or a failed quantization; the message names the file, tensor or option."""


class AngelSlimError(QuantizeError):
    """The AngelSlim backend failed; the message carries AngelSlim's own error."""


# --- AI-OS's error classes, under its import path (llm_compression.errors), with its constructors ------------


class CompressionError(Exception):
    """AI-OS's base error: ``message``, a ``context`` dict, ``timestamp``, ``error_type``, ``original_exception``."""

    def __init__(self, message: str, context: dict | None = None, original_exception: Exception | None = None):
        import datetime

        super().__init__(message)
        self.message = message
        self.context = context or {}
        self.timestamp = datetime.datetime.now()
        self.error_type = type(self).__name__
        self.original_exception = original_exception

    def to_dict(self) -> dict:
        return {"error_type": self.error_type, "message": self.message, "context": self.context,
                "timestamp": self.timestamp.isoformat(),
                "original_exception": str(self.original_exception) if self.original_exception else None}

    def __str__(self) -> str:
        return f"{self.error_type}: {self.message}" + (f", context={self.context}" if self.context else "")


def _context(**values) -> dict:
    return {k: v for k, v in values.items() if v is not None}


class StorageError(CompressionError):
    """A read or write failed (AI-OS: ``operation``, ``path`` ... in the context)."""

    def __init__(self, message: str, operation: str | None = None, path: str | None = None, memory_id: str | None = None,
                 category: str | None = None, original_exception: Exception | None = None):
        super().__init__(message, _context(operation=operation, path=path, memory_id=memory_id, category=category),
                         original_exception)


class ConfigurationError(CompressionError):
    """A configuration value is invalid (AI-OS: ``config_key``, ``config_value`` ... in the context)."""

    def __init__(self, message: str, config_key: str | None = None, config_value=None, expected_type: str | None = None,
                 config_file: str | None = None, original_exception: Exception | None = None):
        super().__init__(message, _context(config_key=config_key,
                                           config_value=str(config_value) if config_value is not None else None,
                                           expected_type=expected_type, config_file=config_file), original_exception)


class QualityError(CompressionError):
    """A quality check failed (AI-OS: ``metric_type``, ``quality_score``, ``threshold`` ... in the context)."""

    def __init__(self, message: str, memory_id: str | None = None, quality_score: float | None = None,
                 threshold: float | None = None, metric_type: str | None = None, details: dict | None = None,
                 original_exception: Exception | None = None):
        super().__init__(message, _context(memory_id=memory_id, quality_score=quality_score, threshold=threshold,
                                           metric_type=metric_type, details=details), original_exception)
