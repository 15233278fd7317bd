"""The one LSB-first bit packer: unsigned ``bits``-wide codes along the last dim, as one bit stream per
row, in 8-bit (uint8) or 32-bit (int32) words.

Every packed layout the store reads is this stream or a fixed reordering of it: our ``ptq`` and 2-bit
grid rows (uint8 words), compressed-tensors ``pack-quantized`` and GPTQ v1 (int32 words; GPTQ packs
along dim 0, so its callers transpose), AWQ (int32 words after its column interleave), NVFP4 and
W4A8 nibbles (uint8 words).
"""

from __future__ import annotations

import math

import torch

WORD_DTYPES = {8: torch.uint8, 32: torch.int32}


def words_for(count: int, bits: int, word_bits: int = 8) -> int:
    """Words holding ``count`` codes of ``bits`` bits."""
    return math.ceil(count * bits / word_bits)


def _check(bits: int, word_bits: int) -> None:
    if word_bits not in WORD_DTYPES:
        raise ValueError(f"word_bits must be 8 or 32, got {word_bits}")
    if not 1 <= bits <= word_bits:
        raise ValueError(f"bits must lie in [1, {word_bits}], got {bits}")


def pack(codes: torch.Tensor, bits: int, word_bits: int = 8) -> torch.Tensor:
    """``[..., n]`` codes in ``[0, 2**bits)`` -> ``[..., words_for(n)]`` words; the last word is zero-padded.

    A code may cross a word boundary (3, 5, 6, 7 bits): its low bits end the word, its high bits start
    the next one. 32-bit words come back as int32 with the same bits (two's complement).
    """
    _check(bits, word_bits)
    n = codes.shape[-1]
    lead = tuple(codes.shape[:-1])
    n_words = words_for(n, bits, word_bits)
    c = codes.reshape(-1, n).to(torch.int64)
    if word_bits % bits == 0:  # whole codes per word: shift and add (fields never overlap)
        per_word = word_bits // bits
        c = torch.nn.functional.pad(c, (0, n_words * per_word - n))
        shifts = torch.arange(per_word, dtype=torch.int64) * bits
        words = (c.view(c.shape[0], n_words, per_word) << shifts).sum(dim=-1)
    else:
        offsets = torch.arange(n, dtype=torch.int64) * bits
        word, shift = offsets // word_bits, offsets % word_bits
        words = torch.zeros(c.shape[0], n_words + 1, dtype=torch.int64)
        words.index_add_(1, word, c << shift)
        spill = (shift + bits) > word_bits
        if bool(spill.any()):
            words.index_add_(1, word[spill] + 1, c[:, spill] >> (word_bits - shift[spill]))
        words = words[:, :n_words] & ((1 << word_bits) - 1)
    if word_bits == 32:
        words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(WORD_DTYPES[word_bits]).reshape(*lead, n_words)


def unpack(words: torch.Tensor, bits: int, count: int, word_bits: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack`: ``[..., n_words]`` -> int32 codes ``[..., count]``.

    ``word_bits`` defaults to the words' own width (uint8/int8: 8, int32: 32).
    """
    word_bits = word_bits or 8 * words.element_size()
    _check(bits, word_bits)
    mask = (1 << bits) - 1
    if word_bits % bits == 0:
        per_word = word_bits // bits
        w = words.view(torch.uint8) if word_bits == 8 else words.view(torch.int32)
        w = w.to(torch.int32)
        shifts = torch.arange(per_word, dtype=torch.int32) * bits
        fields = (w.unsqueeze(-1) >> shifts) & mask  # an arithmetic shift's sign bits are masked away
        return fields.reshape(*words.shape[:-1], -1)[..., :count]
    w = words.to(torch.int64) & ((1 << word_bits) - 1)
    offsets = torch.arange(count, dtype=torch.int64) * bits
    word, shift = offsets // word_bits, offsets % word_bits
    low = w[..., word] >> shift
    following = w[..., torch.clamp(word + 1, max=w.shape[-1] - 1)] << (word_bits - shift)
    high = torch.where(shift + bits > word_bits, following, torch.zeros_like(low))
    return ((low | high) & mask).to(torch.int32)
