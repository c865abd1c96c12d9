"""The contract between a KV codec and the cache / attention code that stores and reads its records.

A codec turns vectors x[..., H, d] (H = KV heads of one layer, d = head_dim) into fixed-size byte
records rec[..., H, record_bytes] (uint8) and back. Attention never needs x itself: it works in the
codec's *rotated space*, where <q, x_hat> == <rotate(q), decode_rotated(rec)> exactly, because
`rotate` is orthogonal (a per-head channel permutation followed by block rotations). Values are
accumulated in that space and `unrotate`d once. QJL-carrying codecs (prod types, qjl) add an
estimator term: gamma * qjl_scale * <qjl_project(rotate(q)), signs>.

Record layout (what a kernel reads): packed code planes first, then the fp16 norms, little-endian,
`record_bytes` even so the record can also be viewed as fp16. Each codec documents its exact layout.
"""

from __future__ import annotations

import torch


class KVCodec:
    """One layer's K or V codec. Subclasses set the attributes and implement the methods."""

    name: str  # registry name, e.g. "tq3.5"
    dim: int  # head_dim
    heads: int  # KV heads of the layer (per-head state such as outlier channel sets)
    record_bytes: int  # exact bytes stored per (token, head)
    has_qjl: bool = False  # scores need the QJL estimator term
    needs_calibration: bool = False  # split types choose outlier channels from data

    @property
    def bits_per_value(self) -> float:
        """Bits stored per coordinate, norms and scales included."""
        return self.record_bytes * 8 / self.dim

    def calibrate(self, x: torch.Tensor) -> None:
        """Choose data-dependent state (outlier channels) from x[N, H, d]; no-op for most codecs."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x[..., H, d] (any float dtype) -> uint8 rec[..., H, record_bytes]."""
        raise NotImplementedError

    def decode(self, rec: torch.Tensor) -> torch.Tensor:
        """rec -> x_hat[..., H, d] float32 in the original space."""
        return self.unrotate(self.decode_rotated(rec))

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x[..., H, d] -> float32 rotated coordinates (queries go through this once per step)."""
        raise NotImplementedError

    def unrotate(self, y: torch.Tensor) -> torch.Tensor:
        """Inverse of rotate."""
        raise NotImplementedError

    def decode_rotated(self, rec: torch.Tensor) -> torch.Tensor:
        """rec -> rotate(x_hat)[..., H, d] float32, norms applied (the MSE part for prod types)."""
        raise NotImplementedError

    def rotated_parts(self, rec: torch.Tensor, scratch=None) -> list[tuple[int, int, torch.Tensor, torch.Tensor | None]]:
        """decode_rotated(rec) as (lo, hi, unit [..., hi - lo] float32, norms [...] float32 or None)
        parts: decode_rotated(rec)[..., lo:hi] == unit * norms[..., None]. Attention folds the norms
        into its scores and probabilities (one multiply per token, not per coordinate). scratch:
        see TurboQuantMSE.unit_values (the parts are then valid until the next call)."""
        return [(0, self.dim, self.decode_rotated(rec), None)]

    # QJL part, only where has_qjl
    qjl_dim: int = 0  # m, number of sign bits per vector

    def qjl_project(self, q_rot: torch.Tensor) -> torch.Tensor:
        """rotated queries [..., H, d] -> S q_rot [..., H, m] float32."""
        raise NotImplementedError

    def qjl_signs(self, rec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """rec -> (signs [..., H, m] as +-1 float32, gamma [..., H] float32 already times the
        estimator constant, so the score term is gamma * <S q_rot, signs>)."""
        raise NotImplementedError

    def qjl_unproject(self, signs: torch.Tensor) -> torch.Tensor:
        """signs [..., H, m] -> Sᵀ signs [..., H, d] float32 (the QJL term as a vector, for reconstruct)."""
        raise NotImplementedError

    def reconstruct(self, rec: torch.Tensor) -> torch.Tensor:
        """rec -> the full estimate of x[..., H, d] float32: decode plus, where has_qjl, the QJL term.
        <q, reconstruct(rec)> equals reference_scores(self, q, rec); for prod types it is unbiased."""
        y = self.decode_rotated(rec)
        if self.has_qjl:
            signs, gamma = self.qjl_signs(rec)
            y = y + gamma.unsqueeze(-1) * self.qjl_unproject(signs)
        return self.unrotate(y)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Data-dependent state to save with a cache (outlier channels); seeds rebuild the rest."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass


def reference_scores(codec: KVCodec, q: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
    """The score formula attention kernels implement, in plain torch: q[..., H, d] against
    rec[..., H, record_bytes] (broadcast over leading dims) -> [..., H] float32.
    <rotate(q), decode_rotated(rec)> + gamma * <qjl_project(rotate(q)), signs> where has_qjl."""
    q_rot = codec.rotate(q)
    s = (q_rot * codec.decode_rotated(rec)).sum(-1)
    if codec.has_qjl:
        signs, gamma = codec.qjl_signs(rec)
        s = s + gamma * (codec.qjl_project(q_rot) * signs).sum(-1)
    return s
