"""formats/_bitpack: the one LSB-first packer every packed layout is built on."""

from __future__ import annotations

import torch
from hypothesis import given, settings, strategies as st

from llm_workbook.formats import _bitpack


def by_hand(codes: list[int], bits: int, word_bits: int) -> list[int]:
    """The bit stream written one bit at a time, cut into unsigned words."""
    stream = [(code >> b) & 1 for code in codes for b in range(bits)]
    stream += [0] * (-len(stream) % word_bits)
    return [sum(bit << i for i, bit in enumerate(stream[w:w + word_bits])) for w in range(0, len(stream), word_bits)]


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), word_bits=st.sampled_from([8, 32]), rows=st.integers(1, 3),
       n=st.integers(1, 40), data=st.data())
def test_pack_is_the_lsb_first_stream_and_unpack_inverts_it(bits, word_bits, rows, n, data):
    codes = torch.tensor(data.draw(st.lists(st.lists(st.integers(0, (1 << bits) - 1), min_size=n, max_size=n),
                                            min_size=rows, max_size=rows)))
    words = _bitpack.pack(codes, bits, word_bits)
    assert words.dtype == _bitpack.WORD_DTYPES[word_bits]
    assert words.shape == (rows, _bitpack.words_for(n, bits, word_bits))
    unsigned = words.to(torch.int64) & ((1 << word_bits) - 1)
    for row in range(rows):
        assert unsigned[row].tolist() == by_hand(codes[row].tolist(), bits, word_bits)
    assert torch.equal(_bitpack.unpack(words, bits, n), codes.to(torch.int32))


def test_bad_widths_are_refused():
    for bits, word_bits in ((0, 8), (9, 8), (4, 16)):
        try:
            _bitpack.pack(torch.zeros(1, 4, dtype=torch.int64), bits, word_bits)
        except ValueError:
            continue
        raise AssertionError((bits, word_bits))
