"""PolarQuant (Han et al. 2025): precondition with a random rotation, then write each block of 16
coordinates as one radius and 15 angles by a recursive polar transform, quantizing the angles with
codebooks for their known densities. After the rotation the coordinates are ≈ i.i.d. Gaussian, so the
level-1 angles are uniform on [0, 2π) and a level-l angle (l >= 2) between two radii of 2^(l-1)
coordinates each has density ∝ sin^(2^(l-1) - 1)(2ψ) on [0, π/2]: no per-block scale is needed.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from .base import KVCodec
from .codebook import lloyd_max
from .packing import pack, packed_bytes, unpack
from .records import assemble, check_input, check_norms, check_record, even, fp16_bytes, pad_to, read_fp16
from .rotation import Rotation, derive_seed

BLOCK = 16
LEVELS = 4


@lru_cache(maxsize=None)
def angle_codebook(level: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids, inner boundaries) float64 for a level's angle density (level 1: uniform circle)."""
    n = 1 << bits
    if level == 1:
        step = 2 * math.pi / n
        c = (np.arange(n) + 0.5) * step
        return torch.from_numpy(c), torch.from_numpy(np.arange(1, n) * step)
    power = 2 ** (level - 1) - 1
    c, b, _ = lloyd_max(lambda t: np.abs(np.sin(2 * t)) ** power, 0.0, math.pi / 2, n)
    return torch.from_numpy(c), torch.from_numpy(b)


class PolarQuant(KVCodec):
    """PolarQuant with blocks of 16 (4 levels) at `bits` per level (default 4/2/2/2) and an fp16 radius
    per block: per block 8·4 + 4·2 + 2·2 + 1·2 = 46 bits of angles + 16 of radius = 3.875 bits/coord.

    Record, for nb = d/16 blocks, each level's codes block-major (block i's level-l angles contiguous):
    [level-1 4-bit plane, 8·nb codes][level-2 2-bit plane, 4·nb][level-3, 2·nb][level-4, nb]
    [zero pad to even][nb radii fp16]. d = 128: 32 + 8 + 4 + 2 + 16 = 62 bytes; d = 64 pads one byte
    (24 + 8 = 32 bytes, 4.0 bits). Rotated space: Π x.
    """

    def __init__(self, dim: int, *, seed: int = 0, rotation: str = "hadamard", heads: int = 1,
                 bits: tuple[int, ...] = (4, 2, 2, 2), name: str = "polar"):
        if dim % BLOCK:
            raise ValueError(f"PolarQuant needs head_dim divisible by {BLOCK}, got {dim}")
        if len(bits) != LEVELS:
            raise ValueError(f"PolarQuant needs {LEVELS} per-level bit widths, got {bits}")
        self.name, self.dim, self.heads, self.bits = name, dim, heads, tuple(bits)
        self.rot = Rotation(dim, derive_seed(seed, 4), rotation)
        self.blocks = dim // BLOCK
        self.counts = [dim >> lvl for lvl in range(1, LEVELS + 1)]  # angles per level: d/2, d/4, ...
        self.level_bytes = [packed_bytes(n, b) for n, b in zip(self.counts, self.bits)]
        self.norm_at = even(sum(self.level_bytes))
        self.record_bytes = self.norm_at + 2 * self.blocks
        self._books = [angle_codebook(lvl + 1, b) for lvl, b in enumerate(self.bits)]
        self._dev: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def _book(self, like: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        key = (like.device, like.dtype)
        if key not in self._dev:
            self._dev[key] = [(c.to(like.device, like.dtype), b.to(like.device, like.dtype)) for c, b in self._books]
        return self._dev[key]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x = check_input(x, self.dim)
        r = self.rot.apply(x)  # [..., d]; in block order the pairs are adjacent coordinates
        books = self._book(r)
        planes = []
        for lvl in range(LEVELS):
            a, b = r[..., 0::2], r[..., 1::2]
            psi = torch.atan2(b, a)
            if lvl == 0:
                psi = torch.remainder(psi, 2 * math.pi)
            idx = torch.bucketize(psi, books[lvl][1]).clamp_max((1 << self.bits[lvl]) - 1)
            planes.append(pack(idx.to(torch.uint8), self.bits[lvl]))
            r = torch.hypot(a, b)
        check_norms(x, r.amax(-1), "block radius")
        codes = pad_to(torch.cat(planes, -1), self.norm_at)
        return assemble([codes, fp16_bytes(r)], self.record_bytes)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        return self.rot.apply(check_input(x, self.dim))

    def unrotate(self, y: torch.Tensor) -> torch.Tensor:
        return self.rot.inverse(y if y.dtype == torch.float64 else y.float())

    def decode_rotated(self, rec: torch.Tensor) -> torch.Tensor:
        check_record(rec, self.record_bytes, self.name)
        r = read_fp16(rec, self.norm_at, self.blocks)  # [..., nb]
        books = self._book(r)
        starts = np.cumsum([0] + self.level_bytes)
        for lvl in reversed(range(LEVELS)):
            idx = unpack(rec[..., starts[lvl] : starts[lvl + 1]], self.bits[lvl], self.counts[lvl])
            psi = books[lvl][0][idx.long()]
            r = torch.stack([r * torch.cos(psi), r * torch.sin(psi)], -1).flatten(-2)
        return r
