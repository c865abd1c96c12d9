"""Quantize-on-write: one fused Triton kernel normalizes, rotates, bucketizes, packs and stores the K or
V records of many tokens straight into their paged slots; plus `RecordLayout`, a codec's record as
the kernels read it.

A record (tqinfer/quant/packing.py) holds code planes and fp16 scales at fixed byte offsets. The
kernels see a codec as: one dense rotation matrix per head (rotate(x)_h = rotation[h] @ x_h, so a
split codec's channel permutation and per-part rotations are one matrix), up to two MSE parts over
consecutive rotated channels (each with its own bits, centroids, boundaries and norm), and for prod
types a QJL part: a 1-bit sign plane whose "centroids" are ±1 and whose scale is gamma.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# fp32-accurate products on tensor cores (three tf32 passes): codes must match the codec's bucketize
PREC = tl.constexpr("tf32x3")


@dataclass(frozen=True)
class CodePart:
    """One quantizer inside a record: `dim` codes of `bits` bits over rotated channels
    [channel, channel + dim), planes at byte `planes`, fp16 scale at byte `scale`, centroids at
    `table` in RecordLayout.tables and inner boundaries at `bounds` in RecordLayout.boundaries."""

    channel: int
    dim: int
    bits: int
    planes: int
    scale: int
    table: int
    bounds: int


@dataclass
class RecordLayout:
    """A codec's record as kernels read it (see the module docstring). Tensors live on one device."""

    dim: int
    heads: int
    record_bytes: int
    parts: tuple[CodePart, ...]  # MSE parts, 1 or 2
    rotation: torch.Tensor  # [H, d, d] float32
    tables: torch.Tensor  # float32: every part's centroids, then [-1, 1] for the QJL signs
    boundaries: torch.Tensor  # float32: every part's inner boundaries
    qjl: CodePart | None = None  # channel counts in the extended query [q_rot | S q_rot]
    qjl_matrix: torch.Tensor | None = None  # S [H, m, d] float32 (rotated space)
    qjl_scale: float = 1.0  # score term = qjl_scale * stored gamma * <S q_rot, signs>

    @property
    def qjl_scaled(self) -> torch.Tensor:
        """qjl_scale * S [H, m, d]: the QJL residual of values in rotated space is its rows summed."""
        if "_qjl_scaled" not in self.__dict__:
            self.__dict__["_qjl_scaled"] = (self.qjl_matrix * self.qjl_scale).contiguous()
        return self.__dict__["_qjl_scaled"]

    def to(self, device) -> "RecordLayout":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return RecordLayout(self.dim, self.heads, self.record_bytes, self.parts, move(self.rotation),
                            move(self.tables), move(self.boundaries), self.qjl, move(self.qjl_matrix),
                            self.qjl_scale)

    def check(self) -> None:
        for p in self.parts + ((self.qjl,) if self.qjl else ()):
            if not 1 <= p.bits <= 4:
                raise ValueError(f"kernels read 1..4-bit code planes, got a {p.bits}-bit part")
            if p.dim < 16 or p.dim & (p.dim - 1):
                raise ValueError(f"kernels need parts of a power-of-two width >= 16, got {p.dim}")
        if len(self.parts) not in (1, 2):
            raise ValueError(f"kernels read records of one or two MSE parts, got {len(self.parts)}")


def _codec_parts(codec) -> tuple[list[dict], dict | None]:
    """The MSE parts (and QJL part) of a tqinfer.quant codec, in record order."""
    from tqinfer.quant.turboquant import TurboQuantProd, mse_parts

    parts = [dict(channel=p.channel, dim=p.quantizer.dim, bits=p.quantizer.bits, planes=p.planes, scale=p.scale,
                  centroids=p.quantizer.centroids64, boundaries=p.quantizer.boundaries64) for p in mse_parts(codec)]
    if type(codec) is TurboQuantProd:
        return parts, dict(dim=codec.sketch.m, planes=codec.code_bytes, scale=codec.norm_at + 2,
                           matrix=codec.sketch.matrix64, gamma_scale=codec.sketch.scale)
    return parts, None


def supports(codec) -> bool:
    """Whether the fused kernels read this codec's records (None, the dense type, always)."""
    if codec is None:
        return True
    try:
        parts, qjl = _codec_parts(codec)
    except NotImplementedError:
        return False
    return all(1 <= p["bits"] <= 4 and p["dim"] >= 16 and p["dim"] & (p["dim"] - 1) == 0
               for p in parts + ([dict(qjl, bits=1)] if qjl else []))


def record_layout(codec, device) -> RecordLayout:
    """The RecordLayout of a tqinfer.quant codec on `device`, kept on the codec until its state (a
    split codec's calibrated channel permutation) changes."""
    cache = codec.__dict__.setdefault("_kernel_layouts", {})
    key = str(torch.device(device))
    state = layout_state(codec)
    if key not in cache or cache[key][0] is not state:
        cache[key] = (state, _build_layout(codec).to(device))
    return cache[key][1]


def layout_state(codec):
    """What a codec's RecordLayout depends on beyond its fixed parameters: a split codec's calibrated
    channel permutation (a new object whenever it is calibrated or loaded), None for the others."""
    return getattr(codec, "perm", None)


def _build_layout(codec) -> RecordLayout:
    from tqinfer.quant.turboquant import rotation_matrices

    d, h = codec.dim, codec.heads
    rotation = rotation_matrices(codec)  # [H, d_out, d_in]
    mse_parts, qjl_info = _codec_parts(codec)
    parts, tables, bounds, t_off, b_off = [], [], [], 0, 0
    for p in mse_parts:
        c, b = p["centroids"].float().flatten(), p["boundaries"].float().flatten()
        parts.append(CodePart(p["channel"], p["dim"], p["bits"], p["planes"], p["scale"], t_off, b_off))
        tables.append(c)
        bounds.append(b)
        t_off += c.numel()
        b_off += b.numel()
    qjl, qjl_matrix, qjl_scale = None, None, 1.0
    if qjl_info is not None:
        qjl = CodePart(d, qjl_info["dim"], 1, qjl_info["planes"], qjl_info["scale"], t_off, b_off)
        tables.append(torch.tensor([-1.0, 1.0]))
        s = qjl_info["matrix"].float()
        qjl_matrix = s.unsqueeze(0).expand(h, *s.shape).contiguous()
        qjl_scale = float(qjl_info["gamma_scale"])
    layout = RecordLayout(d, h, codec.record_bytes, tuple(parts), rotation, torch.cat(tables),
                          torch.cat(bounds), qjl, qjl_matrix, qjl_scale)
    layout.check()
    return layout


# ----------------------------------------------------------------------------------------------------
# kernel


@triton.jit
def _pack_plane(code, out_row, tmask, POS: tl.constexpr, W: tl.constexpr, OFF: tl.constexpr,
                BT: tl.constexpr, DP: tl.constexpr, PERM3: tl.constexpr = False):
    """Store bits [POS, POS + W) of code[BT, DP] as a plane of width W at byte OFF of each record
    (PERM3: the 1-bit plane of 3-bit codes, its bits in packing.PERM3's order)."""
    PB: tl.constexpr = 8 // W
    f = (code >> POS) & ((1 << W) - 1)
    f3 = tl.reshape(f, [BT, DP // PB, PB])
    sh = tl.arange(0, PB) * W
    if PERM3:
        sh = (sh & 1) | ((sh & 2) << 1) | ((sh & 4) >> 1)
    byte = tl.sum(f3 << sh[None, None, :], axis=2)  # disjoint bit fields: the sum is an OR
    j = tl.arange(0, DP // PB)
    tl.store(out_row[:, None] + OFF + j[None, :], byte.to(tl.uint8), mask=tmask[:, None])


@triton.jit
def _rotate_rows(x_rows, tmask, rot_ptr, CH: tl.constexpr, DP: tl.constexpr, D: tl.constexpr,
                 BT: tl.constexpr, KC: tl.constexpr):
    """Rotated channels [CH, CH + DP) of the rows x_rows[BT] as fp32 [BT, DP]. The product runs KC
    input channels at a time (x's slice loaded per step: a register tile cannot be sliced), so only a
    [DP, KC] slice of the rotation is live: the whole [DP, D] matrix as a tf32x3 dot operand (two fp32
    tiles: high and low parts) spilled registers at d 128. Slicing changes only the order of an fp32
    sum: a coordinate within rounding of a boundary may flip, as it may between any two fp32 products
    (the codec's and the kernel's), not more often."""
    rows = CH + tl.arange(0, DP)
    y = tl.zeros([BT, DP], dtype=tl.float32)
    for k in tl.range(0, D, KC):
        cols = k + tl.arange(0, KC)
        x = tl.load(x_rows[:, None] + cols[None, :], mask=tmask[:, None], other=0.0).to(tl.float32)
        m = tl.load(rot_ptr + rows[:, None] * D + cols[None, :])  # [DP, KC]
        y = tl.dot(x, tl.trans(m), y, input_precision=PREC)
    return y


@triton.jit
def _quantize_part(y, out_row, tmask, DP: tl.constexpr, BITS: tl.constexpr, PLANE: tl.constexpr,
                   SCALE: tl.constexpr, BND: tl.constexpr, BT: tl.constexpr):
    """Codes and norm of one part from its rotated coordinates y[BT, DP], stored; (u, codes, norm)."""
    n = tl.sqrt(tl.sum(y * y, axis=1))
    u = y / tl.where(n > 0, n, 1.0)[:, None]
    code = tl.zeros([BT, DP], dtype=tl.int32)
    for k in tl.static_range((1 << BITS) - 1):
        code += (u > BND[k]).to(tl.int32)  # the boundaries are immediates: no loads after the products
    # planes: widths 4, 2, 1 present in BITS, lowest code bits first
    POS2: tl.constexpr = (BITS // 4) * 4
    POS1: tl.constexpr = POS2 + ((BITS // 2) % 2) * 2
    OFF2: tl.constexpr = PLANE + (BITS // 4) * (DP // 2)
    OFF1: tl.constexpr = OFF2 + ((BITS // 2) % 2) * (DP // 4)
    if BITS // 4 == 1:
        _pack_plane(code, out_row, tmask, 0, 4, PLANE, BT, DP)
    if (BITS // 2) % 2 == 1:
        _pack_plane(code, out_row, tmask, POS2, 2, OFF2, BT, DP)
    if BITS % 2 == 1:
        _pack_plane(code, out_row, tmask, POS1, 1, OFF1, BT, DP, BITS == 3)
    tl.store((out_row + SCALE).to(tl.pointer_type(tl.float16)), n.to(tl.float16), mask=tmask)
    return u, code, n


@triton.jit
def _quantize_residual(u, code, n, tab_ptr, s_ptr, out_row, tmask, TAB: tl.constexpr, M: tl.constexpr,
                       PLANE: tl.constexpr, SCALE: tl.constexpr, D: tl.constexpr, BT: tl.constexpr,
                       KC: tl.constexpr):
    """TurboQuant-prod: QJL signs of the rotated unit residual r = u - c[code] (bit set where
    <s_i, r> >= 0) and gamma = ||x|| * ||r||. The signs go KC rows of S at a time (KC / 8 bytes of
    the plane each), for the reason _rotate_rows gives."""
    r = u - tl.load(tab_ptr + TAB + code)
    cols = tl.arange(0, D)
    for i in tl.range(0, M, KC):
        rows = i + tl.arange(0, KC)
        sm = tl.load(s_ptr + rows[:, None] * D + cols[None, :])  # [KC, D]
        proj = tl.dot(r, tl.trans(sm), input_precision=PREC)  # [BT, KC]
        _pack_plane((proj >= 0).to(tl.int32), out_row + i // 8, tmask, 0, 1, PLANE, BT, KC)
    gamma = n * tl.sqrt(tl.sum(r * r, axis=1))
    tl.store((out_row + SCALE).to(tl.pointer_type(tl.float16)), gamma.to(tl.float16), mask=tmask)


@triton.jit
def _layer_ptr(row, i, like):
    """Column i of a layer's row in the pointer table, as a pointer of like's type."""
    return tl.load(row + i).to(like.dtype)


@triton.jit
def _quantize_kv_kernel(xk_ptr, xv_ptr, slot_ptr, pk_ptr, pv_ptr, rk_ptr, rv_ptr, tk_ptr, tv_ptr,
                        sk_ptr, sv_ptr, N, s_t, s_h, s_pos, seq_ptr, src_ptr, layer_ptr,
                        H: tl.constexpr, BS: tl.constexpr, REC: tl.constexpr, D: tl.constexpr,
                        BT: tl.constexpr, KC: tl.constexpr,
                        CH_A: tl.constexpr, D_A: tl.constexpr, BITS_A: tl.constexpr, PL_A: tl.constexpr,
                        SC_A: tl.constexpr, BND_A: tl.constexpr, TAB_A: tl.constexpr,
                        CH_B: tl.constexpr, D_B: tl.constexpr, BITS_B: tl.constexpr, PL_B: tl.constexpr,
                        SC_B: tl.constexpr, BND_B: tl.constexpr,
                        M_Q: tl.constexpr, PL_Q: tl.constexpr, SC_Q: tl.constexpr, HOT: tl.constexpr,
                        LAYERS: tl.constexpr):
    """K and V of the same record layout in one launch: programs [0, H) write K, [H, 2H) V (few tokens
    a launch at a decode step, where the launches, not the work, are the cost); a grid of H
    programs writes K alone (write_tokens, one codec's tokens). HOT: token i is row src[i] of sequence
    seq[i] in the hot buffers x[slot, h, pos, :] (strides s_t, s_h, s_pos). LAYERS: program_id(2) is a
    layer, whose ten tensors (x K / V, pool K / V, rotation K / V, tables K / V, QJL matrix K / V) are
    at row program_id(2) of the int64 table layer_ptr; the arguments are layer 0's (their types)."""
    if LAYERS:
        row = layer_ptr + tl.program_id(2) * 10
        xk_ptr, xv_ptr = _layer_ptr(row, 0, xk_ptr), _layer_ptr(row, 1, xv_ptr)
        pk_ptr, pv_ptr = _layer_ptr(row, 2, pk_ptr), _layer_ptr(row, 3, pv_ptr)
        rk_ptr, rv_ptr = _layer_ptr(row, 4, rk_ptr), _layer_ptr(row, 5, rv_ptr)
        tk_ptr, tv_ptr = _layer_ptr(row, 6, tk_ptr), _layer_ptr(row, 7, tv_ptr)
        sk_ptr, sv_ptr = _layer_ptr(row, 8, sk_ptr), _layer_ptr(row, 9, sv_ptr)
    hh = tl.program_id(1)
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    tmask = t < N
    if HOT:
        seq = tl.load(seq_ptr + t, mask=tmask, other=0).to(tl.int64)
        rows = seq * s_t + tl.load(src_ptr + t, mask=tmask, other=0).to(tl.int64) * s_pos
    else:
        rows = t.to(tl.int64) * s_t
    h = hh % H
    if hh < H:
        _quantize_rows(xk_ptr + rows, t, tmask, slot_ptr, pk_ptr, rk_ptr, tk_ptr, sk_ptr, s_h, h,
                       H, BS, REC, D, BT, KC, CH_A, D_A, BITS_A, PL_A, SC_A, BND_A, TAB_A,
                       CH_B, D_B, BITS_B, PL_B, SC_B, BND_B, M_Q, PL_Q, SC_Q)
    else:
        _quantize_rows(xv_ptr + rows, t, tmask, slot_ptr, pv_ptr, rv_ptr, tv_ptr, sv_ptr, s_h, h,
                       H, BS, REC, D, BT, KC, CH_A, D_A, BITS_A, PL_A, SC_A, BND_A, TAB_A,
                       CH_B, D_B, BITS_B, PL_B, SC_B, BND_B, M_Q, PL_Q, SC_Q)


@triton.jit
def _quantize_rows(x_rows, t, tmask, slot_ptr, pool_ptr, rot_ptr, tab_ptr, s_ptr, sx_h, h,
                   H: tl.constexpr, BS: tl.constexpr, REC: tl.constexpr, D: tl.constexpr,
                   BT: tl.constexpr, KC: tl.constexpr,
                   CH_A: tl.constexpr, D_A: tl.constexpr, BITS_A: tl.constexpr, PL_A: tl.constexpr,
                   SC_A: tl.constexpr, BND_A: tl.constexpr, TAB_A: tl.constexpr,
                   CH_B: tl.constexpr, D_B: tl.constexpr, BITS_B: tl.constexpr, PL_B: tl.constexpr,
                   SC_B: tl.constexpr, BND_B: tl.constexpr,
                   M_Q: tl.constexpr, PL_Q: tl.constexpr, SC_Q: tl.constexpr):
    """Tokens t[BT] (head-0 rows x_rows[BT]) of head h: records into their pool slots."""
    x_head = x_rows + h * sx_h
    slot = tl.load(slot_ptr + t, mask=tmask, other=0)
    blk = slot // BS
    off = slot % BS
    out_row = pool_ptr + ((blk * H + h) * BS + off) * REC
    rot_h = rot_ptr + h * D * D
    if D_B == D_A and CH_B == CH_A + D_A:  # two halves (tq3.5, tq2.5): one pass of products for both
        y = tl.reshape(_rotate_rows(x_head, tmask, rot_h, CH_A, 2 * D_A, D, BT, KC), [BT, 2, D_A])
        ya, yb = tl.split(tl.permute(y, (0, 2, 1)))
    else:
        ya = _rotate_rows(x_head, tmask, rot_h, CH_A, D_A, D, BT, KC)
        yb = ya
        if D_B > 0:
            yb = _rotate_rows(x_head, tmask, rot_h, CH_B, D_B, D, BT, KC)
    u, code, n = _quantize_part(ya, out_row, tmask, D_A, BITS_A, PL_A, SC_A, BND_A, BT)
    if D_B > 0:
        _quantize_part(yb, out_row, tmask, D_B, BITS_B, PL_B, SC_B, BND_B, BT)
    if M_Q > 0:
        _quantize_residual(u, code, n, tab_ptr, s_ptr + h * M_Q * D, out_row, tmask, TAB_A, M_Q, PL_Q,
                           SC_Q, D, BT, KC)


def bound_values(layout: RecordLayout, part: CodePart) -> tuple[float, ...]:
    """A part's inner boundaries as Python floats (exact fp32 values), the kernel's immediates; kept on
    the layout (a host copy: not while a CUDA graph is captured)."""
    cache = layout.__dict__.setdefault("_kernel_bounds", {})
    if part.bounds not in cache:
        cache[part.bounds] = tuple(layout.boundaries[part.bounds:part.bounds + (1 << part.bits) - 1].tolist())
    return cache[part.bounds]


def _part_args(layout: RecordLayout) -> dict:
    """Kernel constants of parts A and B (B of width 0 when absent) and the QJL part (M_Q 0 if none)."""
    a = layout.parts[0]
    b = layout.parts[1] if len(layout.parts) > 1 else None
    q = layout.qjl or CodePart(0, 0, 1, 0, 0, 0, 0)
    args = dict(CH_A=a.channel, D_A=a.dim, BITS_A=a.bits, PL_A=a.planes, SC_A=a.scale,
                BND_A=bound_values(layout, a), TAB_A=a.table,
                CH_B=0, D_B=0, BITS_B=1, PL_B=0, SC_B=0, BND_B=(0.0,), M_Q=q.dim, PL_Q=q.planes, SC_Q=q.scale)
    if b is not None:
        args.update(CH_B=b.channel, D_B=b.dim, BITS_B=b.bits, PL_B=b.planes, SC_B=b.scale,
                    BND_B=bound_values(layout, b))
    return args


def write_tokens(codec, x: torch.Tensor, pool: torch.Tensor, slots: torch.Tensor) -> None:
    """Quantize x[N, H, d] and store each token's records at pool slot `slots[i]` (block * BS + offset;
    pool [num_blocks, H, BS, record_bytes] uint8). A dense pool (codec None) takes x as it is."""
    n, h, d = x.shape
    if pool.shape[1] != h:
        raise ValueError(f"pool has {pool.shape[1]} heads, tokens have {h}")
    bs = pool.shape[2]
    slots = slots.to(device=x.device, dtype=torch.int64)
    if codec is None:
        if pool.shape[3] != d:
            raise ValueError(f"dense pool holds head_dim {pool.shape[3]}, tokens have {d}")
        pool[slots // bs, :, slots % bs] = x.to(pool.dtype)
        return
    if n == 0:
        return
    if not supports(codec):  # records no kernel writes (polar, q8, q4, qjl, *-paper): the codec's own
        from . import reference
        return reference.write_tokens(codec, x, pool, slots)
    if x.stride(2) != 1:
        x = x.contiguous()
    _kv_launch(codec, None, x, x, pool, pool, slots, n, (x.stride(0), x.stride(1), 0))


BT = 16  # tokens per program
# rotation columns (QJL rows) per step of the kernel's products. sm_90, triton 3.6, d 128: 32 spills
# in no case (128-229 registers; the whole matrix at once: 255 and up to 1.2 KB of stack), 64 sits at
# 255 registers and spills again, 16 takes twice the steps for no fewer registers in tqp types
KC = 32


def _tensors(layout: RecordLayout) -> tuple[torch.Tensor, ...]:
    """The kernel's per-layout tensors: rotation, tables, QJL matrix (tables if none)."""
    s_mat = layout.qjl_matrix if layout.qjl is not None else layout.tables
    return layout.rotation, layout.tables, s_mat


def _same_layout(k_codec, v_codec, device) -> bool:
    """Whether K and V records share one layout (same type): then one launch writes both."""
    if k_codec is None or v_codec is None or not (supports(k_codec) and supports(v_codec)):
        return False
    kl, vl = record_layout(k_codec, device), record_layout(v_codec, device)
    return kl.record_bytes == vl.record_bytes and _part_args(kl) == _part_args(vl)


def _check_pools(name: str, layout: RecordLayout, h: int, *pools: torch.Tensor) -> None:
    for pool in pools:
        if pool.dtype != torch.uint8 or pool.shape[1] != h or pool.shape[3] != layout.record_bytes \
                or not pool.is_contiguous():
            raise ValueError(f"{name} pool must be contiguous uint8 [blocks, {h}, BS, "
                             f"{layout.record_bytes}], got {pool.dtype} {list(pool.shape)}")


def _kv_launch(k_codec, v_codec, xk, xv, k_pool, v_pool, slots, n, strides, hot=None, layers=None) -> None:
    """One launch of _quantize_kv_kernel: K and V (layouts alike, _same_layout), or K alone where
    v_codec is None; hot: (seq, src) rows of hot buffers xk / xv; layers: (table, count), the tensors
    given being layer 0's."""
    h, d = k_pool.shape[1], xk.shape[-1]
    layout = record_layout(k_codec, xk.device)
    _check_pools(k_codec.name, layout, h, k_pool, v_pool)
    rk, tk, sk = _tensors(layout)
    rv, tv, sv = (rk, tk, sk) if v_codec is None else _tensors(record_layout(v_codec, xk.device))
    seq, src = hot if hot is not None else (slots, slots)
    table, count = layers if layers is not None else (slots, 1)
    parts = _part_args(layout)
    kc = min(KC, d, parts["M_Q"] or d)  # a step no wider than the matrices it walks
    _quantize_kv_kernel[(triton.cdiv(n, BT), h if v_codec is None else 2 * h, count)](
        xk, xv, slots.to(torch.int64), k_pool, v_pool, rk, rv, tk, tv, sk, sv, n, *strides, seq, src, table,
        H=h, BS=k_pool.shape[2], REC=layout.record_bytes, D=d, BT=BT, KC=kc, HOT=hot is not None,
        LAYERS=layers is not None, **parts)


def write_kv_tokens(k_codec, k: torch.Tensor, k_pool: torch.Tensor, v_codec, v: torch.Tensor,
                    v_pool: torch.Tensor, slots: torch.Tensor) -> None:
    """write_tokens for K and V at the same slots, in one launch where both codecs have the same
    record layout (K and V of one cache type); two writes otherwise."""
    if not (k.shape == v.shape and k.shape[0] and _same_layout(k_codec, v_codec, k.device)):
        write_tokens(k_codec, k, k_pool, slots)
        write_tokens(v_codec, v, v_pool, slots)
        return
    k, v = k.contiguous(), v.contiguous()
    _kv_launch(k_codec, v_codec, k, v, k_pool, v_pool, slots.to(k.device), k.shape[0], (k.stride(0), k.stride(1), 0))


def retire_window(layers, seq: torch.Tensor, src_hot: torch.Tensor, rec_dst: torch.Tensor) -> None:
    """A decode step's records, written for all layers at its start: hot row src_hot[i] of sequence
    seq[i] (the token leaving the recent window) to flat pool slot rec_dst[i], in each layer of
    `layers` [(k_codec, v_codec, k_hot, v_hot, k_pool, v_pool)]. One launch per group of layers alike
    (K and V of one record layout, buffers of one shape: every layer of a model with one cache type),
    through a table of the layers' tensor addresses; other layers by the twin's gathers and writes."""
    if seq.shape[0] == 0:
        return
    groups, others = _layer_groups(layers)
    if others:
        from . import reference
        reference.retire_window(others, seq, src_hot, rec_dst, write=write_tokens)
    for group in groups:
        kc, vc, kh, vh, kp, vp = group[0]
        _kv_launch(kc, vc, kh, vh, kp, vp, rec_dst, seq.shape[0], (kh.stride(0), kh.stride(1), kh.stride(2)),
                   hot=(seq, src_hot), layers=(_layer_table(group), len(group)))


def prepare_retire(layers) -> list[torch.Tensor]:
    """The address tables retire_window will read for these layers, built now (a host-to-device copy:
    ahead of a CUDA graph capture, which cannot make one); a graph captured next holds them."""
    return [_layer_table(group) for group in _layer_groups(layers)[0]]


def _layer_groups(layers) -> tuple[list[list], list]:
    """(groups of layers one launch writes, the layers it does not): K and V of one record layout
    (_same_layout), contiguous hot buffers of one dtype; a group shares layouts and shapes."""
    groups: dict = {}
    others = []
    for layer in layers:
        kc, vc, kh, vh, kp, vp = layer
        if not (_same_layout(kc, vc, kh.device) and kh.stride() == vh.stride() and kh.is_contiguous()
                and vh.is_contiguous() and kh.dtype == vh.dtype):
            others.append(layer)
            continue
        key = (tuple(_part_args(record_layout(kc, kh.device)).items()), kh.shape, kh.dtype, kp.shape, vp.shape)
        groups.setdefault(key, []).append(layer)
    return list(groups.values()), others


# tables of layer addresses, by content (new ones come with new codec layouts: a calibration, a loaded
# sequence), the latest MAX_TABLES kept; a captured decode graph holds the ones it reads (prepare_retire)
_TABLES: dict = {}
MAX_TABLES = 64


def _layer_table(group) -> torch.Tensor:
    """int64 [layers, 10] on the device: each layer's x K / V, pool K / V, rotation K / V, tables K / V,
    QJL matrix K / V addresses (_quantize_kv_kernel's LAYERS order). Built once per content, never
    while a CUDA graph is captured (prepare_retire builds it ahead)."""
    rows = []
    for kc, vc, kh, vh, kp, vp in group:
        (rk, tk, sk), (rv, tv, sv) = (_tensors(record_layout(c, kh.device)) for c in (kc, vc))
        rows.append(tuple(x.data_ptr() for x in (kh, vh, kp, vp, rk, rv, tk, tv, sk, sv)))
    device = group[0][2].device
    key = (str(device), tuple(rows))
    if key not in _TABLES:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("retire_window's layer table was not built before the CUDA graph capture "
                               "(call prepare_retire with the layers first)")
        while len(_TABLES) >= MAX_TABLES:
            del _TABLES[next(iter(_TABLES))]
        _TABLES[key] = torch.tensor(rows, dtype=torch.int64, device=device)
    return _TABLES[key]
