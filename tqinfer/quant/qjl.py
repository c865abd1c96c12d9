"""QJL: a 1-bit Johnson-Lindenstrauss sketch sign(S k) with the asymmetric, unbiased estimator
<q, k> ≈ √(π/2)/m · ||k|| · <S q, sign(S k)>. Used alone for keys ("qjl") and on TurboQuant-prod's
residual.
"""

from __future__ import annotations

import math

import torch

from .base import KVCodec
from .packing import pack, packed_bytes, unpack
from .records import assemble, pad_to, check_input, check_norms, check_record, even, fp16_bytes, read_fp16
from .rotation import derive_seed, haar_orthogonal

SKETCHES = ("gaussian", "orthogonal")


def _sphere_abs_mean(d: int) -> float:
    """E|v_1| for v uniform on the unit sphere in R^d."""
    return math.exp(math.lgamma(d / 2) - math.lgamma((d + 1) / 2)) / math.sqrt(math.pi)


class QJLSketch:
    """S [m, d]. "gaussian": i.i.d. N(0, 1). "orthogonal": rows of Haar orthogonal blocks, each scaled to
    length √(2/π) / E|v_1| so that E[<s, q> sign(<s, r>)] = √(2/π) <q, r>/||r|| exactly as for a
    Gaussian row: the same estimator constant stays unbiased, with less variance (rows don't overlap)."""

    def __init__(self, dim: int, m: int, seed: int, kind: str = "gaussian"):
        if kind not in SKETCHES:
            raise ValueError(f"unknown QJL sketch {kind!r}; choose one of {SKETCHES}")
        self.dim, self.m, self.kind = dim, m, kind
        if kind == "gaussian":
            g = torch.Generator().manual_seed(seed)
            s = torch.randn(m, dim, generator=g, dtype=torch.float64)
        else:
            blocks = [haar_orthogonal(dim, derive_seed(seed, i)) for i in range(-(-m // dim))]
            s = torch.cat(blocks, 0)[:m] * (math.sqrt(2 / math.pi) / _sphere_abs_mean(dim))
        self.matrix64 = s
        self.scale = math.sqrt(math.pi / 2) / m  # estimator constant
        self._cache: dict[tuple, torch.Tensor] = {}

    def _s(self, like: torch.Tensor) -> torch.Tensor:
        key = (like.device, like.dtype)
        if key not in self._cache:
            self._cache[key] = self.matrix64.to(device=like.device, dtype=like.dtype)
        return self._cache[key]

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """x[..., d] -> S x [..., m]."""
        return x @ self._s(x).T

    def unproject(self, y: torch.Tensor) -> torch.Tensor:
        """y[..., m] -> Sᵀ y [..., d]."""
        return y @ self._s(y)

    def sign_bits(self, x: torch.Tensor) -> torch.Tensor:
        """x[..., d] -> packed sign plane uint8 [..., m/8] (bit set where <s_i, x> >= 0)."""
        return pack((self.project(x) >= 0).to(torch.uint8), 1)

    def signs(self, packed: torch.Tensor) -> torch.Tensor:
        """packed sign plane -> ±1 float32 [..., m]."""
        return unpack(packed, 1, self.m).float() * 2 - 1


class SketchedCodec(KVCodec):
    """A codec carrying QJL signs of a vector in its rotated space, sketched by `sketch`."""

    sketch: QJLSketch

    def qjl_project(self, q_rot: torch.Tensor) -> torch.Tensor:
        return self.sketch.project(q_rot)

    def qjl_unproject(self, signs: torch.Tensor) -> torch.Tensor:
        return self.sketch.unproject(signs)


class QJLCodec(SketchedCodec):
    """Keys as a 1-bit sketch plus norm (m = d: 1 bit per coordinate before the norm).

    Record [sign plane: m/8 bytes, bit i = sign(<s_i, k>) per packing.py][norm fp16][pad to even].
    No rotation (rotate is the identity) and no MSE part (decode_rotated is zero): the whole score is
    the QJL term norm · √(π/2)/m · <S q, signs>. Meant for keys; values need a decodable codec.
    """

    has_qjl = True

    def __init__(self, dim: int, heads: int = 1, *, seed: int = 0, sketch: str = "orthogonal",
                 m: int | None = None, name: str = "qjl"):
        self.name, self.dim, self.heads = name, dim, heads
        self.sketch = QJLSketch(dim, m or dim, derive_seed(seed, 3), sketch)
        self.qjl_dim = self.sketch.m
        self.sign_bytes = even(packed_bytes(self.qjl_dim, 1))
        self.record_bytes = self.sign_bytes + 2

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x = check_input(x, self.dim)
        n = torch.linalg.vector_norm(x, dim=-1)
        check_norms(x, n)
        signs = pad_to(self.sketch.sign_bits(x), self.sign_bytes)
        return assemble([signs, fp16_bytes(n.unsqueeze(-1))], self.record_bytes)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        return check_input(x, self.dim)

    def unrotate(self, y: torch.Tensor) -> torch.Tensor:
        return y if y.dtype == torch.float64 else y.float()

    def decode_rotated(self, rec: torch.Tensor) -> torch.Tensor:
        check_record(rec, self.record_bytes, self.name)
        return torch.zeros(*rec.shape[:-1], self.dim, device=rec.device)

    def qjl_signs(self, rec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_record(rec, self.record_bytes, self.name)
        signs = self.sketch.signs(rec[..., : packed_bytes(self.qjl_dim, 1)])
        norm = read_fp16(rec, self.sign_bytes, 1).squeeze(-1)
        return signs, norm * self.sketch.scale
