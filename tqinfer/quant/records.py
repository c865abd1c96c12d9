"""Byte-level pieces every codec's record shares: input checks, fp16 fields, even-length padding."""

from __future__ import annotations

import torch

FP16_MAX = 65504.0


def check_input(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Validate x[..., dim] at the boundary where it enters a codec; return it as float32 (float64 kept)."""
    if not x.is_floating_point():
        raise TypeError(f"codec input must be a float tensor, got {x.dtype}")
    if x.shape[-1] != dim:
        raise ValueError(f"codec for head_dim {dim} got vectors of size {x.shape[-1]}")
    return x if x.dtype == torch.float64 else x.float()


def check_norms(x: torch.Tensor, norms: torch.Tensor, what: str = "norm") -> None:
    """One host sync per encode: non-finite inputs and values beyond fp16 are errors, never inf/NaN
    in a record."""
    bad = ~torch.isfinite(norms) | (norms > FP16_MAX)
    if bool(bad.any()):
        if not bool(torch.isfinite(x).all()):
            raise ValueError("codec input contains NaN or Inf")
        worst = float(norms[bad].max())
        raise ValueError(
            f"a vector's {what} is {worst:.4g}, beyond the fp16 range (max {FP16_MAX:g}) its record "
            "stores; rescale the input"
        )


def even(n: int) -> int:
    """Round a byte count up to even, so records (and fp16 fields in them) stay 2-byte aligned."""
    return n + (n & 1)


def fp16_bytes(t: torch.Tensor) -> torch.Tensor:
    """float [..., k] -> uint8 [..., 2k] (little-endian fp16)."""
    return t.to(torch.float16).contiguous().view(torch.uint8)


_WIDE = ((8, torch.int64), (4, torch.int32), (2, torch.int16))


def contiguous_bytes(x: torch.Tensor) -> torch.Tensor:
    """A strided uint8 [..., n] (one field of every record) as a contiguous copy, moved in the widest
    elements its layout allows: on the CPU a strided copy costs per element, so byte-wise (or
    converting) copies of record fields cost ~2-4x more (the CPU decode step copies fields of every
    cached record)."""
    if x.is_contiguous() or x.dim() == 0 or x.stride(-1) != 1:
        return x.contiguous()
    strides = x.stride()[:-1]
    for w, wide in _WIDE:
        if x.shape[-1] % w == 0 and x.storage_offset() % w == 0 and all(s % w == 0 for s in strides):
            return x.view(wide).contiguous().view(torch.uint8)
    return x.contiguous()


def read_fp16(rec: torch.Tensor, offset: int, count: int) -> torch.Tensor:
    """`count` fp16 fields starting at byte `offset` of each record -> float32 [..., count]."""
    return contiguous_bytes(rec[..., offset : offset + 2 * count]).view(torch.float16).float()


def pad_to(t: torch.Tensor, nbytes: int) -> torch.Tensor:
    """Zero-pad uint8 [..., k] to [..., nbytes]."""
    pad = nbytes - t.shape[-1]
    return torch.nn.functional.pad(t, (0, pad)) if pad else t


def assemble(parts: list[torch.Tensor], record_bytes: int) -> torch.Tensor:
    """Concatenate uint8 record parts and zero-pad to record_bytes."""
    return pad_to(torch.cat(parts, -1), record_bytes)


def check_record(rec: torch.Tensor, record_bytes: int, name: str) -> None:
    if rec.dtype != torch.uint8 or rec.shape[-1] != record_bytes:
        raise ValueError(
            f"{name} records are uint8 [..., {record_bytes}], got {rec.dtype} [..., {rec.shape[-1]}]"
        )
