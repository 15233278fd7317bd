"""The package's errors, in one place that imports nothing: every layer raises them, none depends on
another just to do so."""


class StoreError(ValueError):
    """Bad input or a broken file; the message names the file and the tensor."""


class UnsupportedFormatError(StoreError):
    """A checkpoint or tensor whose quantization format we do not read."""


class QuantizeError(StoreError):
    """Bad quantize input or a failed quantization; the message names the file, tensor or option."""


class AngelSlimError(QuantizeError):
    """The AngelSlim backend failed; the message carries AngelSlim's own error."""
