"""Giving freed memory back to the OS between the phases of a long job."""

from __future__ import annotations

import ctypes
import gc


def return_freed_memory() -> None:
    """Collect garbage and hand the allocator's free pages back to the OS (glibc's ``malloc_trim``; a no-op
    elsewhere). glibc keeps freed blocks of a phase (one GPTQ layer, the original model of an evaluation)
    for reuse, so the next phase's peak RSS stands on top of them."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
