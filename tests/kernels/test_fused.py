"""The decoder layer's small fused kernels (interpreter on CPU, Triton on CUDA) against their torch
twins and float64 math on fresh random inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tqinfer.kernels import fused  # (tests/kernels/conftest.py set TRITON_INTERPRET on CPU)

from .cachegen import DEV



@pytest.mark.parametrize("t,d,residual", [(1, 64, True), (5, 576, True), (3, 96, False)])
def test_add_rms_norm(t, d, residual):
    g = torch.Generator().manual_seed(t * d)
    x, h = (torch.randn(t, d, generator=g) for _ in range(2))
    w = torch.randn(d, generator=g)
    x, h, w = x.to(DEV), h.to(DEV), w.to(DEV)
    got_x, got_n = fused.add_rms_norm(x, h if residual else None, w, 1e-5, kernel=True)
    s = (x.double() + h.double()) if residual else x.double()
    want = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
    assert not torch.isnan(got_n).any()
    torch.testing.assert_close(got_x.double(), s, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_n.double(), want, rtol=1e-5, atol=1e-5)
    twin_x, twin_n = fused.add_rms_norm(x, h if residual else None, w, 1e-5, kernel=False)
    torch.testing.assert_close(got_n, twin_n, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t,nq,nkv,hd", [(1, 4, 2, 64), (7, 9, 3, 64), (2, 8, 8, 128)])
def test_rope_split(t, nq, nkv, hd):
    g = torch.Generator().manual_seed(t + hd)
    qkv = torch.randn(t, (nq + 2 * nkv) * hd, generator=g).to(DEV)
    positions = torch.randint(0, 500, (t,), generator=g).to(DEV)
    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    ang = torch.outer(torch.arange(512, dtype=torch.float64), inv)
    emb = torch.cat([ang, ang], -1)
    cos, sin = emb.cos().float().to(DEV), emb.sin().float().to(DEV)
    q, k, v = fused.rope_split(qkv, positions, cos, sin, nq, nkv, hd, kernel=True)

    def rope64(x):  # rotate pairs (i, i + d/2) by position * inv_freq[i], float64
        x = x.double().cpu()
        a = ang[positions.cpu()][:, None, :]
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return torch.cat([x1 * a.cos() - x2 * a.sin(), x2 * a.cos() + x1 * a.sin()], -1)

    x = qkv.view(t, nq + 2 * nkv, hd)
    for got, want in ((q, rope64(x[:, :nq])), (k, rope64(x[:, nq:nq + nkv]))):
        assert not torch.isnan(got).any()
        torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(v, x[:, nq + nkv:])
    twin = fused.rope_split(qkv, positions, cos, sin, nq, nkv, hd, kernel=False)
    for a, b in zip((q, k, v), twin):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t,h", [(1, 1536), (3, 100)])
def test_silu_mul(t, h):
    g = torch.Generator().manual_seed(h)
    gu = torch.randn(t, 2 * h, generator=g).to(DEV)
    got = fused.silu_mul(gu, kernel=True)
    a, b = gu.double().split([h, h], -1)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got.double(), F.silu(a) * b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m,n,k,bias,dtype,views", [(1, 100, 72, False, torch.bfloat16, False),
                                                    (5, 64, 576, True, torch.bfloat16, False),
                                                    (16, 300, 1100, False, torch.float16, False),
                                                    (3, 2100, 96, True, torch.float16, False),
                                                    (4, 40, 200, True, torch.bfloat16, True)])
def test_skinny_linear(m, n, k, bias, dtype, views):
    """fused.linear's kernel (decode rows) == float64 x . w^T + b to an ulp of the output dtype, == the
    twin (F.linear); tiles past n and k masked (n, k no multiple of the tile), outputs finite. views: x
    and w column slices of wider tensors and w every other row of one (row strides != k)."""
    g = torch.Generator().manual_seed(m * n + k)
    if views:  # sliced after the conversion (a conversion copies)
        x = torch.randn(m, k + 7, generator=g).to(DEV, dtype)[:, 3:3 + k]
        w = (torch.randn(2 * n, k + 5, generator=g) / k ** 0.5).to(DEV, dtype)[::2, 5:]
        assert x.stride() == (k + 7, 1) and w.stride() == (2 * (k + 5), 1)
    else:
        x = torch.randn(m, k, generator=g).to(DEV, dtype)
        w = (torch.randn(n, k, generator=g) / k ** 0.5).to(DEV, dtype)
    b = torch.randn(n, generator=g).to(DEV, dtype) if bias else None
    got = fused.linear(x, w, b, kernel=True)
    want = x.double() @ w.double().T + (b.double() if bias else 0)
    assert got.shape == (m, n) and got.dtype == dtype and torch.isfinite(got).all()
    eps = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10  # an ulp of the output (the interpreter truncates)
    assert ((got.double() - want).abs() <= eps * want.abs() + 1e-3 * want.abs().max()).all()
    twin = fused.linear(x, w, b, kernel=False)
    torch.testing.assert_close(got, twin, rtol=2 * eps, atol=2e-3 * float(want.abs().max()))


def test_linear_takes_the_kernel_for_decode_rows_only(monkeypatch):
    """Up to SKINNY_ROWS rows of bf16 / fp16 go to the kernel; more rows, fp32, mixed dtypes, a bias of
    another dtype or stride, a transposed weight, x strided along its columns, a weight of SKINNY_MAX_OUT
    rows or more, or no kernel: F.linear (which raises on mismatched shapes, as before)."""
    from tqinfer.kernels import fused_triton

    calls = []
    monkeypatch.setattr(fused_triton, "skinny_linear", lambda x, w, b: calls.append(x.shape[0]) or F.linear(x, w, b))
    bf = torch.bfloat16
    w = torch.randn(8, 32).to(DEV, bf)
    for rows in (1, fused.SKINNY_ROWS, fused.SKINNY_ROWS + 1):
        fused.linear(torch.randn(rows, 32).to(DEV, bf), w, kernel=True)
    x = torch.randn(2, 32).to(DEV, bf)
    fused.linear(x.float(), w.float(), kernel=True)
    with pytest.raises(RuntimeError):  # mixed dtypes: F.linear's error, not the kernel's garbage
        fused.linear(x, w.half(), kernel=True)
    with pytest.raises(RuntimeError):  # an fp32 bias: likewise
        fused.linear(x, w, torch.zeros(8, device=DEV), kernel=True)
    fused.linear(x, w, torch.zeros(16, device=DEV, dtype=bf)[::2], kernel=True)  # strided bias
    fused.linear(x, w.t().contiguous().t(), kernel=True)  # a transposed weight: stride(1) != 1
    fused.linear(torch.randn(2, 64).to(DEV, bf)[:, ::2], w, kernel=True)  # x strided along its columns
    fused.linear(x, w, kernel=False)
    with pytest.raises(RuntimeError):  # K mismatch: likewise
        fused.linear(torch.randn(2, 31).to(DEV, bf), w, kernel=True)
    monkeypatch.setattr(fused, "SKINNY_MAX_OUT", 8)
    fused.linear(x, w, kernel=True)
    assert calls == [1, fused.SKINNY_ROWS]


def test_skinny_linear_refuses_more_rows_than_its_mma():
    from tqinfer.kernels import fused_triton

    x = torch.randn(17, 32).to(DEV, torch.bfloat16)
    with pytest.raises(ValueError, match="1 to 16 rows"):
        fused_triton.skinny_linear(x, torch.randn(8, 32).to(DEV, torch.bfloat16), None)


def test_early_launch_off_without_a_hopper_gpu(monkeypatch):
    """fused_triton.pdl: no programmatic dependent launch on the CPU or under the interpreter (the kernels'
    griddepcontrol is compiled CUDA code), even when PDL is set; elsewhere PDL forces it either way."""
    from tqinfer.kernels import fused_triton

    t = torch.zeros(1, device=DEV)
    for forced in (None, False, True):
        monkeypatch.setattr(fused_triton, "PDL", forced)
        if fused_triton.INTERPRET:
            assert fused_triton.pdl(t) is False
        elif forced is not None:
            assert fused_triton.pdl(t) is forced
        else:
            assert fused_triton.pdl(t) == (DEV == "cuda" and torch.cuda.get_device_capability() >= (9, 0))
