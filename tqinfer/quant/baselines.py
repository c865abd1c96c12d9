"""Reference cache types the TurboQuant family is measured against: raw bf16, int8 absmax per vector,
int4 with per-32-group scale and zero (KIVI / llama.cpp q4_1-like). No rotation: rotate is the identity.
"""

from __future__ import annotations

import torch

from .base import KVCodec
from .packing import pack, unpack
from .records import check_input, check_norms, check_record, fp16_bytes, read_fp16

GROUP = 32


class _Unrotated(KVCodec):
    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        return check_input(x, self.dim)

    def unrotate(self, y: torch.Tensor) -> torch.Tensor:
        return y if y.dtype == torch.float64 else y.float()


class BF16Codec(_Unrotated):
    """Dense bf16. Record [d bf16 values] (2d bytes)."""

    def __init__(self, dim: int, heads: int = 1, name: str = "bf16"):
        self.name, self.dim, self.heads = name, dim, heads
        self.record_bytes = 2 * dim

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x = check_input(x, self.dim)
        if not bool(torch.isfinite(x).all()):
            raise ValueError("codec input contains NaN or Inf")
        return x.to(torch.bfloat16).contiguous().view(torch.uint8)

    def decode_rotated(self, rec: torch.Tensor) -> torch.Tensor:
        check_record(rec, self.record_bytes, self.name)
        return rec.contiguous().view(torch.bfloat16).float()


class Q8Codec(_Unrotated):
    """int8, symmetric absmax per vector: x̂ = scale · q, scale = max|x| / 127 rounded to fp16.
    Record [d int8][scale fp16] (d + 2 bytes)."""

    def __init__(self, dim: int, heads: int = 1, name: str = "q8"):
        if dim % 2:
            raise ValueError(f"q8 needs an even head_dim, got {dim}")
        self.name, self.dim, self.heads = name, dim, heads
        self.record_bytes = dim + 2

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x = check_input(x, self.dim)
        amax = x.abs().amax(-1)
        check_norms(x, amax / 127, "int8 scale")
        scale = (amax / 127).half().float()  # quantize against the scale the record stores
        q = torch.round(x / scale.clamp_min(1e-30).unsqueeze(-1)).clamp(-127, 127)
        q = torch.where(scale.unsqueeze(-1) > 0, q, torch.zeros_like(q))
        return torch.cat([q.to(torch.int8).view(torch.uint8), fp16_bytes(scale.unsqueeze(-1))], -1)

    def decode_rotated(self, rec: torch.Tensor) -> torch.Tensor:
        check_record(rec, self.record_bytes, self.name)
        q = rec[..., : self.dim].contiguous().view(torch.int8).float()
        return q * read_fp16(rec, self.dim, 1)


class Q4Codec(_Unrotated):
    """int4 asymmetric per group of 32: x̂ = zero + scale · q, q in 0..15, scale = (max - min)/15,
    zero = min, both fp16. Record [4-bit plane, d/2 bytes][per group: scale fp16, zero fp16]
    (d = 128: 64 + 16 = 80 bytes, 5 bits per value)."""

    def __init__(self, dim: int, heads: int = 1, name: str = "q4"):
        if dim % GROUP:
            raise ValueError(f"q4 needs head_dim divisible by {GROUP}, got {dim}")
        self.name, self.dim, self.heads = name, dim, heads
        self.groups = dim // GROUP
        self.record_bytes = dim // 2 + 4 * self.groups

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x = check_input(x, self.dim)
        g = x.reshape(*x.shape[:-1], self.groups, GROUP)
        lo, hi = g.amin(-1), g.amax(-1)
        check_norms(x, torch.maximum(hi.abs(), lo.abs()).amax(-1), "absolute value")
        # fp16 rounding of zero/scale happens before the codes are chosen, so decode matches encode
        zero = lo.half().float()
        scale = ((hi - zero) / 15).half().float()
        q = torch.round((g - zero.unsqueeze(-1)) / scale.clamp_min(1e-30).unsqueeze(-1)).clamp(0, 15)
        q = torch.where(scale.unsqueeze(-1) > 0, q, torch.zeros_like(q))
        codes = pack(q.reshape(*x.shape).to(torch.uint8), 4)
        return torch.cat([codes, fp16_bytes(torch.stack([scale, zero], -1).flatten(-2))], -1)

    def decode_rotated(self, rec: torch.Tensor) -> torch.Tensor:
        check_record(rec, self.record_bytes, self.name)
        q = unpack(rec[..., : self.dim // 2], 4, self.dim).float()
        sz = read_fp16(rec, self.dim // 2, 2 * self.groups).unflatten(-1, (self.groups, 2))
        g = q.unflatten(-1, (self.groups, GROUP)) * sz[..., 0:1] + sz[..., 1:2]
        return g.flatten(-2)

