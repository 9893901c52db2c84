import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradzip.compress import CompressionError
from gradzip.compress.packing import (
    pack_base3,
    pack_bits,
    packed_size,
    unpack_base3,
    unpack_bits,
)


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(0, 3000), seed=st.integers(0, 2**31))
def test_pack_unpack_round_trip(bits: int, n: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 2**bits, (n,), generator=gen, dtype=torch.uint8)
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_size(n, bits) == (n * bits + 7) // 8
    assert torch.equal(unpack_bits(packed, bits, n), values)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 3000), seed=st.integers(0, 2**31))
def test_base3_round_trip(n: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    trits = torch.randint(0, 3, (n,), generator=gen, dtype=torch.uint8)
    packed = pack_base3(trits)
    assert packed.numel() == (n + 4) // 5
    assert torch.equal(unpack_base3(packed, n), trits)


def test_one_bit_layout_is_little_endian() -> None:
    values = torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1], dtype=torch.uint8)
    assert pack_bits(values, 1).tolist() == [0b1000_0001, 0b1]


@pytest.mark.parametrize("bits", [0, 9])
def test_bad_bits_rejected(bits: int) -> None:
    with pytest.raises(CompressionError, match="bits must be"):
        pack_bits(torch.zeros(4, dtype=torch.uint8), bits)


def test_wrong_buffer_size_rejected() -> None:
    with pytest.raises(CompressionError, match="need 2 uint8"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 1, 16)
