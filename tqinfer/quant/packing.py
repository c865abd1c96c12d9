"""Exact-bit packing of b-bit codes into bytes, in a layout a GPU kernel unpacks with shifts and masks.

Layout (the Triton kernels rely on it; do not change it without them):

- Codes of width b are stored as *planes*: b's binary decomposition into widths 4, 2, 1, lowest code
  bits first. b=1: [1]; 2: [2]; 3: [2, 1] (plane 0 holds bits 0-1, plane 1 holds bit 2); 4: [4];
  5: [4, 1]; 6: [4, 2]; 7: [4, 2, 1]; 8: one byte per code (a single plane of width 8).
- A plane of width p packs 8 // p codes per byte: code j sits in byte j // (8 // p) at bit shift
  (j % (8 // p)) * p, least significant bits first. For n codes a plane takes n * p / 8 bytes
  (rounded up to whole bytes when n * p is not a multiple of 8; the unused high bits are zero).
- Except the 1-bit plane of 3-bit codes: code j sits in byte j // 8 at bit PERM3[j % 8] (codes 0-7 at
  bits 0, 1, 4, 5, 2, 3, 6, 7: index bits 1 and 2 swapped). Sixteen codes' 2-bit fields (a 32-bit
  word, code j at bit 2 j) and high bits (16 bits) then become two PRMT selectors of eight nibbles
  (fields in bits 0-1, the high bit in bit 2) with shifts, masks and one byte shuffle, no bit-by-bit
  spreading (decode_gluon's 3-bit lookups).
- Planes are concatenated in order, so plane k starts at byte sum(plane_bytes(n, p) for earlier p).

A kernel reading code j of a b=3 record: lo = (rec[j // 4] >> (2 * (j % 4))) & 3,
hi = (rec[n // 4 + j // 8] >> PERM3[j % 8]) & 1, code = lo | hi << 2. swap3(byte) (an involution)
turns a byte of that plane into plain order (code j at bit j % 8) and back.
"""

from __future__ import annotations

import torch


PERM3 = (0, 1, 4, 5, 2, 3, 6, 7)  # bit of code j % 8 in a byte of the 1-bit plane of 3-bit codes


def swap3(x):
    """Bits 2-3 and 4-5 of each of the low four bytes of x (an int or an integer tensor: bytes or words of
    up to 32 bits) exchanged: PERM3's order to the plain one and back."""
    t = ((x >> 2) ^ x) & 0x0C0C0C0C  # a delta swap: masks that fit any integer width
    return x ^ t ^ (t << 2)


def planes(bits: int) -> list[int]:
    """Plane widths for b-bit codes, lowest code bits first."""
    if not 1 <= bits <= 8:
        raise ValueError(f"code width must be 1..8 bits, got {bits}")
    if bits == 8:
        return [8]
    return [p for p in (4, 2, 1) if bits & p]


def plane_bytes(n: int, width: int) -> int:
    """Bytes one plane of `width`-bit fields takes for n codes."""
    return (n * width + 7) // 8


def packed_bytes(n: int, bits: int) -> int:
    """Bytes that n codes of `bits` bits take (exactly n * bits / 8 when n is a multiple of 8)."""
    return sum(plane_bytes(n, p) for p in planes(bits))


def _shifts(width: int, bits: int) -> list[int]:
    """Bit shift of each of a byte's fields in a plane of `width` of `bits`-bit codes."""
    return list(PERM3) if (width, bits) == (1, 3) else [i * width for i in range(8 // width)]


def _pack_plane(fields: torch.Tensor, width: int, bits: int) -> torch.Tensor:
    per = 8 // width
    n = fields.shape[-1]
    pad = (-n) % per
    if pad:
        fields = torch.nn.functional.pad(fields, (0, pad))
    fields = fields.reshape(*fields.shape[:-1], -1, per)
    weights = torch.tensor([1 << sh for sh in _shifts(width, bits)], dtype=torch.uint8, device=fields.device)
    # disjoint bit fields: the weighted sum is their OR and stays below 256, so uint8 cannot overflow
    return (fields * weights).sum(-1, dtype=torch.uint8)


def _unpack_plane(packed: torch.Tensor, width: int, bits: int, n: int) -> torch.Tensor:
    shifts = torch.tensor(_shifts(width, bits), dtype=torch.uint8, device=packed.device)
    fields = (packed.unsqueeze(-1) >> shifts) & ((1 << width) - 1)
    return fields.reshape(*packed.shape[:-1], -1)[..., :n]


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes uint8 [..., n] with values < 2**bits -> uint8 [..., packed_bytes(n, bits)]."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    if bits == 8:
        return codes.contiguous()
    out, shift = [], 0
    for p in planes(bits):
        out.append(_pack_plane((codes >> shift) & ((1 << p) - 1), p, bits))
        shift += p
    return torch.cat(out, -1) if len(out) > 1 else out[0]


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack: uint8 [..., packed_bytes(n, bits)] -> codes uint8 [..., n]."""
    if packed.shape[-1] != packed_bytes(n, bits):
        raise ValueError(
            f"{n} codes of {bits} bits take {packed_bytes(n, bits)} bytes, got {packed.shape[-1]}"
        )
    if bits == 8:
        return packed
    codes, start, shift = None, 0, 0
    for p in planes(bits):
        nb = plane_bytes(n, p)
        part = _unpack_plane(packed[..., start : start + nb], p, bits, n) << shift
        codes = part if codes is None else codes | part
        start += nb
        shift += p
    return codes
