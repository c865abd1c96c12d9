"""Exact-bit packing: identity, exact sizes, and the byte layout the kernels read."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tqinfer.quant.packing import pack, packed_bytes, planes, swap3, unpack


def layout_oracle(codes: list[int], bits: int) -> list[int]:
    """The documented layout, written out bit by bit: the 1-bit plane of 3-bit codes has code j at bit
    (0, 1, 4, 5, 2, 3, 6, 7)[j % 8], i.e. bits 1 and 2 of j % 8 swapped."""
    out = []
    shift = 0
    for p in planes(bits):
        plane = [0] * ((len(codes) * p + 7) // 8)
        per = 8 // p
        for j, c in enumerate(codes):
            field = (c >> shift) & ((1 << p) - 1)
            e = j % per
            at = ((e & 1) | ((e >> 2) & 1) << 1 | ((e >> 1) & 1) << 2) if (p, bits) == (1, 3) else e * p
            plane[j // per] |= field << at
        out += plane
        shift += p
    return out


def test_swap3_is_the_involution_between_the_3bit_plane_and_plain_order():
    codes = torch.randint(0, 8, (200, 8), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    plane = pack(codes, 3)[:, 2]  # 8 codes: 2 bytes of 2-bit fields, then the 1-bit plane byte
    plain = sum(((codes[:, j].int() >> 2) & 1) << j for j in range(8))
    assert torch.equal(swap3(plane.int()), plain) and torch.equal(swap3(plain), plane.int())
    assert [swap3(1 << j) for j in range(8)] == [1, 2, 16, 32, 4, 8, 64, 128]
    assert swap3(0xA5A5) == (swap3(0xA5) | swap3(0xA5) << 8)  # byte by byte


def test_plane_decomposition():
    assert [planes(b) for b in range(1, 9)] == [[1], [2], [2, 1], [4], [4, 1], [4, 2], [4, 2, 1], [8]]
    assert all(sum(planes(b)) == b for b in range(1, 9))


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 3, 7, 8, 13, 31, 64, 127, 128])
def test_identity_and_layout(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 1 << bits, (3, n), generator=g, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, packed_bytes(n, bits))
    assert torch.equal(unpack(packed, bits, n), codes)
    assert packed[1].tolist() == layout_oracle(codes[1].tolist(), bits)


@pytest.mark.parametrize("bits", range(1, 9))
def test_exact_bits_per_code(bits):
    for n in (8, 64, 128, 256):
        assert packed_bytes(n, bits) * 8 == n * bits


def test_bad_inputs():
    with pytest.raises(TypeError):
        pack(torch.zeros(8, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="bits"):
        pack(torch.zeros(8, dtype=torch.uint8), 9)
    with pytest.raises(ValueError, match="take"):
        unpack(torch.zeros(3, dtype=torch.uint8), 2, 16)


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), lead=st.lists(st.integers(1, 4), max_size=3), n=st.integers(1, 70),
       seed=st.integers(0, 2**31))
def test_identity_any_shape(bits, lead, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (*lead, n), generator=g, dtype=torch.uint8)
    assert torch.equal(unpack(pack(codes, bits), bits, n), codes)


def test_contiguous_bytes_of_record_fields():
    """Fields of strided records copied through wide elements equal the byte-wise copy, for every
    alignment (widths 8, 4, 2 and the byte fallback), offsets into the pool, inference tensors."""
    from tqinfer.quant.records import contiguous_bytes, read_fp16

    pool = torch.randint(0, 256, (6, 40, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        frozen = pool.clone()
    fields = [pool[:, 3:39, 0:16], pool[:, :, 16:24], pool[:, 5:9, 28:32], pool[:, :, 24:26], pool[:, :, 1:5],
              pool[1:3, 7:, 8:16], pool[..., 3], pool[:, :, 30:31], pool.transpose(0, 1)[..., 4:8],
              frozen[:, 1:, 8:24]]
    for field in fields:
        got = contiguous_bytes(field)
        assert got.is_contiguous() and torch.equal(got, field.contiguous()), field.shape
    norms = torch.randn(6, 40, 2).half()
    rec = torch.cat([pool[..., :28], norms.view(torch.uint8)], -1)
    assert torch.equal(read_fp16(rec[:, 2:], 28, 2), norms[:, 2:].float())
