"""Small fused kernels of the decoder layer, so a decode step is a few kernels per layer rather than
dozens (each kernel of a CUDA graph costs its launch slot even when its work is tiny):

- `add_rms_norm`: the residual add and the next RMSNorm in one pass;
- `rope_split`: the fused q/k/v projection's output split into q, k (rotary-embedded) and v;
- `silu_mul`: SiLU(gate) * up from the fused gate/up projection;
- `linear`: the projections of a decode step (at most SKINNY_ROWS rows) by a kernel that streams the
  weight once over every SM (cuBLAS's choices for these skinny shapes leave bandwidth unused).

Each has a torch twin, used off CUDA and as the tests' oracle; the twins are the model's math as
written in models/llama.py before fusion (rotate_half RoPE, RMSNorm in fp32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tqinfer.kernels import dispatch


def use_triton(t: torch.Tensor, kernel: bool | None) -> bool:
    """The Triton kernel on CUDA (unless TQINFER_KERNELS=torch); kernel=True forces it (the
    interpreter's tests), False the twin."""
    if kernel is not None:
        return kernel
    return dispatch.use_triton(t)


# --- residual add + RMSNorm -------------------------------------------------------------------------
def add_rms_norm(x: torch.Tensor, h: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 kernel: bool | None = None):
    """(x + h, RMSNorm(x + h) * weight) for x, h [T, D]; h None: (x, RMSNorm(x) * weight)."""
    if not use_triton(x, kernel):
        if h is not None:
            x = x + h
        return x, F.rms_norm(x, (x.shape[-1],), weight, eps)
    from tqinfer.kernels import fused_triton

    return fused_triton.add_rms_norm(x, h, weight, eps)


# --- q/k/v split + rotary embedding ---------------------------------------------------------------------
def rope_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, d] rotated (rotate_half convention); cos/sin [T, 1, d]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def rope_split(qkv: torch.Tensor, positions: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor,
               nq: int, nkv: int, hd: int, kernel: bool | None = None, gathered=None):
    """qkv [T, (nq + 2 nkv) * hd] -> q [T, nq, hd], k [T, nkv, hd] with RoPE at `positions` (tables
    [max_pos, hd], halves duplicated), v [T, nkv, hd]; all contiguous. gathered: a callable giving
    the tables at `positions` as (cos, sin) [T, 1, hd] (the torch path: one gather per step, shared
    by the layers, not one per layer)."""
    t = qkv.shape[0]
    if not use_triton(qkv, kernel) or hd % 2 or (hd // 2) & (hd // 2 - 1):  # halves of 2^n lanes
        # q and k heads are adjacent in qkv: rotated by one call (a CPU decode step is op-bound)
        cos, sin = gathered() if gathered else (cos_table[positions].unsqueeze(1), sin_table[positions].unsqueeze(1))
        qk = rope_torch(qkv[:, :(nq + nkv) * hd].view(t, nq + nkv, hd), cos, sin)
        q, k = qk[:, :nq], qk[:, nq:]
        if t > 1:
            q, k = q.contiguous(), k.contiguous()
        return q, k, qkv[:, (nq + nkv) * hd:].reshape(t, nkv, hd)
    from tqinfer.kernels import fused_triton

    return fused_triton.rope_split(qkv, positions, cos_table, sin_table, nq, nkv, hd)


# --- SiLU(gate) * up --------------------------------------------------------------------------------
def silu_mul(gu: torch.Tensor, kernel: bool | None = None) -> torch.Tensor:
    """gu [T, 2H] (gate then up) -> SiLU(gate) * up [T, H]."""
    t, h2 = gu.shape
    h = h2 // 2
    if not use_triton(gu, kernel):
        g, u = gu.split([h, h], dim=-1)
        return F.silu(g) * u
    from tqinfer.kernels import fused_triton

    return fused_triton.silu_mul(gu)


# --- decode projections -----------------------------------------------------------------------------
SKINNY_ROWS = 16  # rows (tokens of a step) up to which a bf16 / fp16 projection takes the kernel (its limit)
SKINNY_MAX_OUT = 16384  # from this many output features on, cuBLAS streams the weight as fast or faster (H200)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           kernel: bool | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [T, K], weight [N, K]. On CUDA (kernel None) a decode step's
    1 .. SKINNY_ROWS rows of bf16 / fp16 through a weight of fewer than SKINNY_MAX_OUT rows take
    fused_triton.skinny_linear (fp32 accumulation, like cuBLAS's) on the devices it was built for
    (fused_triton.skinny_device); other shapes, dtypes, layouts and devices F.linear."""
    if kernel is None and not x.is_cuda:
        return F.linear(x, weight, bias)
    n = weight.shape[0]
    if (x.dim() == 2 and weight.dim() == 2 and 0 < x.shape[0] <= SKINNY_ROWS and x.shape[1] == weight.shape[1]
            and n < SKINNY_MAX_OUT and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype
            and x.stride(1) == 1 and weight.stride(1) == 1
            and (bias is None or (bias.dtype == x.dtype and bias.shape == (n,) and bias.stride(0) == 1))
            and use_triton(x, kernel)):
        from tqinfer.kernels import fused_triton

        if fused_triton.skinny_device(x):
            return fused_triton.skinny_linear(x, weight, bias)
    return F.linear(x, weight, bias)
