"""Torch twins of the Triton kernels: the CPU path and the kernels' oracle.

Attention is computed from codes the way the kernels do it: the query is rotated once per KV head,
scores are n_k * <q_rot, c[idx]> (+ the QJL term), values are accumulated in V's rotated space and
un-rotated once; compressed tokens are read tile by tile (never a full-precision copy of the cache)
and merged with the full-precision parts (sinks, recent window, the chunk itself) by log-sum-exp.
"""

from __future__ import annotations

import math
import threading

import torch

from tqinfer.cache.paged import flat_slots, hot_rows, read_tokens, write_dense
from tqinfer.kernels import cpu

# Tokens per tile: a tile's score matrix [H, n * G, N] stays below TILE_SCORES elements (long prefill
# chunks get TILE_TOKENS-token tiles), and a decode step reads up to MAX_TILE_TOKENS in one tile, so
# its per-tile Python cost is paid once per layer at the usual contexts.
TILE_TOKENS = 1024
MAX_TILE_TOKENS = 16384
TILE_SCORES = 1 << 22


def write_tokens(codec, x: torch.Tensor, pool: torch.Tensor, slots: torch.Tensor) -> None:
    """Quantize-on-write: x [N, H, d] -> records at flat token slots [N] of pool [NB, H, BS, rec]."""
    write_dense(pool, x if codec is None else codec.encode(x), slots.long(), pool.shape[2])


def retire_window(layers, seq, src_hot, rec_dst, write=write_tokens) -> None:
    """A decode step's records, for every layer at its start: in each layer (k_codec, v_codec, k_hot,
    v_hot, k_pool, v_pool) of `layers`, hot rows src_hot of sequences seq (the tokens leaving the
    recent window) get records at flat pool slots rec_dst, through `write` (quantize.retire_window:
    one launch for all layers of one cache type)."""
    for k_codec, v_codec, k_hot, v_hot, k_pool, v_pool in layers:
        write(k_codec, k_hot[seq, :, src_hot], k_pool, rec_dst)
        write(v_codec, v_hot[seq, :, src_hot], v_pool, rec_dst)


def enter_window(k_hot, v_hot, k, v, seq, hot_new) -> None:
    """The new tokens k / v [N, H, d] take hot rows hot_new of sequences seq (after the layer's
    attention read the rows' old tokens)."""
    k_hot[seq, :, hot_new] = k.to(k_hot.dtype)
    v_hot[seq, :, hot_new] = v.to(v_hot.dtype)


def _softmax_part(scores: torch.Tensor):
    """scores [..., N] -> (max [...], sum of exp [...], probs [..., N]) with -inf rows handled."""
    m = scores.amax(-1)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(scores - m_safe.unsqueeze(-1))
    return m, p.sum(-1), p


class _Merger:
    """Online softmax over parts: each part adds (max, sum, unnormalized output)."""

    def __init__(self):
        self.m = self.l = self.o = None

    def add(self, m, l, o):
        if self.m is None:
            self.m, self.l, self.o = m, l, o
            return
        new = torch.maximum(self.m, m)
        new_safe = torch.where(torch.isfinite(new), new, torch.zeros_like(new))
        a, b = torch.exp(self.m - new_safe), torch.exp(m - new_safe)
        self.l = self.l * a + l * b
        self.o = self.o * a.unsqueeze(-1) + o * b.unsqueeze(-1)
        self.m = new

    def result(self):
        return self.o / self.l.unsqueeze(-1)


def _dense_part(qg, keys, values, qpos, kpos, scale, window, merger):
    """qg [n, G, H, d] fp32; keys/values [N, H, d]; positions qpos [n], kpos [N]."""
    if keys.shape[0] == 0:
        return
    s = torch.einsum("nghd,khd->nghk", qg, keys.float()) * scale
    mask = kpos[None, :] <= qpos[:, None]
    if window is not None:
        mask &= kpos[None, :] > qpos[:, None] - window
    s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    m, l, p = _softmax_part(s)
    merger.add(m, l, torch.einsum("nghk,khd->nghd", p, values.float()))


def _values_rotated(codec, rec: torch.Tensor) -> torch.Tensor:
    """Values in the codec's rotated space; QJL-carrying types add their unbiased residual term."""
    if codec is None:  # a dense pool beside a compressed one
        return rec.float()
    y = codec.decode_rotated(rec)
    if codec.has_qjl:
        signs, gamma = codec.qjl_signs(rec)
        y = y + gamma.unsqueeze(-1) * codec.qjl_unproject(signs)
    return y


class _Scratch:
    """Buffers reused by every layer of every decode step for its multi-MB intermediates (records,
    code indices, looked-up centroids). Fresh ones page-fault in each time and, with 2 threads, their
    release costs TLB shootdowns: measured 1.5-1.9x slower decode over codes at 6k context on the
    2-core machine. A buffer is valid until its name is asked for again. Buffers made under
    torch.inference_mode cannot be written outside it: each mode has its own."""

    def __init__(self):
        self.buffers: dict[tuple, torch.Tensor] = {}
        # the last view handed out per buffer: every layer of a decode step asks for the same shapes,
        # and two ops (slice, view) per request were ~15% of a CPU decode row's ops
        self.views: dict[tuple, tuple[tuple, torch.Tensor]] = {}

    def __call__(self, name, shape, dtype: torch.dtype) -> torch.Tensor:
        key = (name, dtype, torch.is_inference_mode_enabled())
        shape = tuple(shape)
        last = self.views.get(key)
        if last is not None and last[0] == shape:
            return last[1]
        n = math.prod(shape)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < n:
            buf = self.buffers[key] = torch.empty(n + n // 4, dtype=dtype)
        view = buf[:n].view(shape)
        self.views[key] = (shape, view)
        return view


_scratch = threading.local()


def cpu_scratch(device: torch.device) -> _Scratch | None:
    """This thread's scratch on CPU; None elsewhere (the CUDA caching allocator already reuses)."""
    if device.type != "cpu":
        return None
    if not hasattr(_scratch, "buffers"):
        _scratch.buffers = _Scratch()
    return _scratch.buffers


def _head_records(pool: torch.Tensor, table_row: torch.Tensor, lo: int, hi: int, bs: int,
                  scratch: _Scratch | None = None, name: str = "records") -> torch.Tensor:
    """Tokens [lo, hi) of one sequence from pool [NB, H, BS, r] -> [H, hi - lo, r]: whole blocks
    are gathered (one copy of contiguous rows, not one index per token), heads first for bmm."""
    b0, b1 = lo // bs, -(-hi // bs)
    index = table_row[b0:b1].long()
    _, H, _, r = pool.shape
    if scratch is None:
        blocks = pool.index_select(0, index)  # [nb, H, BS, r]
        x = blocks.transpose(0, 1).reshape(H, (b1 - b0) * bs, r)
    else:
        blocks = torch.index_select(pool, 0, index, out=scratch((name, "blocks"), (b1 - b0, H, bs, r), pool.dtype))
        x = scratch(name, (H, b1 - b0, bs, r), pool.dtype).copy_(blocks.transpose(0, 1)).view(H, -1, r)
    return x[:, lo - b0 * bs:hi - b0 * bs]


def _scores(codec, qh, sq, rec, scratch: _Scratch | None = None) -> torch.Tensor:
    """qh [H, R, d] rotated query rows against records rec [H, N, r] -> [H, R, N] (unscaled). Norms
    multiply the [H, R, N] scores per token instead of every decoded coordinate."""
    if codec is None:
        return torch.bmm(qh, rec.float().transpose(1, 2))
    s = None
    for lo, hi, unit, norms in codec.rotated_parts(rec, scratch):
        if norms is None or qh.shape[1] <= hi - lo:  # decode: fewer query rows than coordinates
            part = torch.bmm(qh[..., lo:hi], unit.transpose(1, 2))
            part = part if norms is None else part * norms.unsqueeze(1)
        else:  # a prefill chunk: scaling the values is the smaller multiply
            part = torch.bmm(qh[..., lo:hi], (unit * norms.unsqueeze(-1)).transpose(1, 2))
        s = part if s is None else s + part
    if sq is not None:
        signs, gamma = codec.qjl_signs(rec)
        s = s + torch.bmm(sq, signs.transpose(1, 2)) * gamma.unsqueeze(1)
    return s


def _weighted_values(codec, p, rec, scratch: _Scratch | None = None) -> torch.Tensor:
    """Probabilities p [H, R, N] times values rec [H, N, r] -> [H, R, d] in the codec's rotated space."""
    if codec is None or codec.has_qjl:
        return torch.bmm(p, _values_rotated(codec, rec))
    outs = []
    for lo, hi, unit, norms in codec.rotated_parts(rec, scratch):
        if norms is None:
            outs.append(torch.bmm(p, unit))
        elif p.shape[1] <= hi - lo:  # decode: fold the norms into the probabilities
            outs.append(torch.bmm(p * norms.unsqueeze(1), unit))
        else:
            outs.append(torch.bmm(p, unit * norms.unsqueeze(-1)))
    return outs[0] if len(outs) == 1 else torch.cat(outs, -1)


def _compressed_part(qg, view, row, lo, hi, qpos, scale, window, merger):
    """Tokens [lo, hi) of the sequence in table row `row`, read from the pools in as few tiles as
    memory allows (a decode step: one tile), all KV heads at once by batched matmuls."""
    if hi <= lo:
        return
    kc, vc, bs = view.k_codec, view.v_codec, view.block_size
    n, G, H, d = qg.shape
    table = view.block_table[row]
    q_rot = qg if kc is None else kc.rotate(qg)  # [n, G, H, d], once per step
    qh = q_rot.permute(2, 0, 1, 3).reshape(H, n * G, d)  # row i * G + g: query i, group member g
    sq = None
    if kc is not None and kc.has_qjl:
        sq = kc.qjl_project(q_rot).permute(2, 0, 1, 3).reshape(H, n * G, -1)
    tile = min(MAX_TILE_TOKENS, max(TILE_TOKENS, TILE_SCORES // (H * n * G)))
    c_k, c_v = (cpu.cpu_attention(c, 1, qg.device) for c in (kc, vc))  # tiles of rotated values from C
    part = _Merger()
    for t0 in range(lo, hi, tile):
        t1 = min(hi, t0 + tile)
        if c_k is not None and sq is None:
            keys = c_k.values_rotated(view.k_pool, table, t0, t1 - t0, torch.empty(H, t1 - t0, d, dtype=torch.float32))
            s = torch.bmm(qh, keys.transpose(1, 2)) * scale
        else:
            s = _scores(kc, qh, sq, _head_records(view.k_pool, table, t0, t1, bs)) * scale  # [H, nG, N]
        if window is not None:  # causal holds already: every compressed token precedes the chunk
            t = torch.arange(t0, t1, device=qg.device)
            seen = (t[None, :] > qpos[:, None] - window).repeat_interleave(G, 0)  # [nG, N]
            s = s.masked_fill(~seen, float("-inf"))
        m, l, p = _softmax_part(s)
        if c_v is not None:
            o = torch.bmm(p, c_v.values_rotated(view.v_pool, table, t0, t1 - t0, torch.empty(H, t1 - t0, d, dtype=torch.float32)))
        else:
            o = _weighted_values(vc, p, _head_records(view.v_pool, table, t0, t1, bs))
        part.add(m, l, o)
    m, l = (x.view(H, n, G).permute(1, 2, 0) for x in (part.m, part.l))
    o = part.o.view(H, n, G, d).permute(1, 2, 0, 3)
    merger.add(m, l, o if vc is None else vc.unrotate(o))  # un-rotate once per step


def _decode_row_c(q1, k1, v1, view, row: int, slot: int, p: int, scale: float, c_k, c_v) -> torch.Tensor | None:
    """_decode_row by the C kernel (kernels/cpu.py): the softmax over hot rows, token and records and
    the hot rows' share of the output in one call, the records' values in a second, then the
    un-rotation; None where the hot rows' dtype is neither bf16 nor fp32 (the twin serves)."""
    from tqinfer.quant.turboquant import rotation_matrices

    H, d = k1.shape
    G = q1.shape[0] // H
    S, W = view.sinks, view.window
    k_hot, v_hot = view.k_hot[slot], view.v_hot[slot]
    if k_hot.dtype not in (torch.bfloat16, torch.float32):
        return None
    rot = rotation_matrices(view.k_codec)
    if rot.shape[0] != H:  # a codec of one head over a pool of several: the twin broadcasts it
        return None
    n_rec, table = max(0, p - W - S), view.block_table[row]
    probs, out = c_k.decode_weights(q1.float().reshape(H, G, d).contiguous(), scale, rot,
                                    k_hot, v_hot, min(p, S + W), k1.to(k_hot.dtype).contiguous(),
                                    v1.to(k_hot.dtype).contiguous(), view.k_pool, table, S, n_rec)
    if n_rec:
        rec = c_v.values(view.v_pool, table, S, n_rec, probs, torch.empty(H, G, d, dtype=torch.float32))
        out = out + view.v_codec.unrotate(rec.transpose(0, 1)).transpose(0, 1)
    return out.reshape(H * G, d)


def _decode_row(q1, k1, v1, view, row: int, slot: int, p: int, scale: float) -> torch.Tensor:
    """One decode token of a compressed layer without a sliding window: q1 [Hq, d], k1/v1 [H, d]
    -> [Hq, d] float32. One softmax over the hot buffer (read in place: slots [0, p) until the
    window wraps, then all of them, and without a sliding window their order does not matter), the
    token itself and the compressed prefix (scores tile by tile, concatenated)."""
    H, d = k1.shape
    G = q1.shape[0] // H
    S, W, bs = view.sinks, view.window, view.block_size
    kc, vc = view.k_codec, view.v_codec
    c_k, c_v = (cpu.cpu_attention(c, G, q1.device) for c in (kc, vc))
    if c_k is not None and c_v is not None:
        out = _decode_row_c(q1, k1, v1, view, row, slot, p, scale, c_k, c_v)
        if out is not None:
            return out
    qh = q1.float().view(H, G, d) * scale  # [H, G, d]: head h = kv * G + g
    nh = min(p, S + W)
    hot_k = torch.cat([view.k_hot[slot, :, :nh], k1.unsqueeze(1).to(view.k_hot.dtype)], 1).float()
    hot_v = torch.cat([view.v_hot[slot, :, :nh], v1.unsqueeze(1).to(view.v_hot.dtype)], 1).float()
    scores = [torch.bmm(qh, hot_k.transpose(1, 2))]  # [H, G, nh + 1]
    tiles = [(t0, min(p - W, t0 + MAX_TILE_TOKENS)) for t0 in range(S, p - W, MAX_TILE_TOKENS)]
    table = view.block_table[row]
    scratch = cpu_scratch(qh.device)
    n_rec = max(0, p - W - S)  # tokens in records: [S, p - W)
    if tiles:
        q_rot = qh if kc is None else kc.rotate(qh.transpose(0, 1)).transpose(0, 1)
        sq = kc.qjl_project(q_rot.transpose(0, 1)).transpose(0, 1) if kc is not None and kc.has_qjl else None
        if c_k is not None:  # the C kernel: every record in one call, straight from the pool
            scores.append(c_k.scores(view.k_pool, table, S, n_rec, q_rot.contiguous(),
                                     scratch("c_scores", (H, G, n_rec), torch.float32)))
        else:
            scores += [_scores(kc, q_rot, sq, _head_records(view.k_pool, table, t0, t1, bs, scratch), scratch)
                       for t0, t1 in tiles]
    prob = torch.softmax(torch.cat(scores, -1), -1)
    out = torch.bmm(prob[..., :nh + 1], hot_v)
    if tiles:
        if c_v is not None:
            o = c_v.values(view.v_pool, table, S, n_rec, prob[..., nh + 1:],
                           scratch("c_values", (H, G, d), torch.float32))
        else:
            o, at = None, nh + 1
            for t0, t1 in tiles:
                rec = _head_records(view.v_pool, table, t0, t1, bs, scratch)
                part = _weighted_values(vc, prob[..., at:at + t1 - t0], rec, scratch)
                o, at = part if o is None else o + part, at + t1 - t0
        out = out + (o if vc is None else vc.unrotate(o.transpose(0, 1)).transpose(0, 1))
    return out.reshape(H * G, d)


def _prefill_sdpa(q, k, v, view, row: int, slot: int, p: int, scale: float) -> torch.Tensor | None:
    """A chunk q [n, Hq, d] (its own k/v [n, H, d]) over its whole cached prefix by one SDPA call in q's
    dtype, on the CPU where the C kernel reads the layer's records: their keys and values decoded in
    whole (kernels/cpu.py) and un-rotated, beside the hot rows and the chunk. Every prefix token
    precedes the chunk, so the prefix needs no mask and its order does not matter. Torch's fused CPU
    attention over bf16 runs 2-3x faster than the twin's explicit fp32 scores, softmax and merge, which
    made prefill over a compressed cache 0.4-0.6x the dense cache's speed. None where this path does
    not apply (the twin serves)."""
    from tqinfer.cache.dense import causal_mask, sdpa

    n, H, d = k.shape
    S, W, bs = view.sinks, view.window, view.block_size
    table = view.block_table[row]
    if view.k_hot is None:  # a dense (protected) layer of the paged cache
        flat = flat_slots(table, torch.arange(p), bs)
        keys, values = [read_tokens(view.k_pool, flat, bs).transpose(0, 1)], [read_tokens(view.v_pool, flat, bs).transpose(0, 1)]
    else:
        c_k, c_v = (cpu.cpu_attention(c, 1, q.device) for c in (view.k_codec, view.v_codec))
        if c_k is None or c_v is None:
            return None
        hot_t, hidx = hot_rows(p, S, W, q.device)
        nh, n_rec = len(hot_t), max(0, p - W - S)  # hot rows + records = the p prefix tokens
        keys, values = (torch.empty(H, p + n, d, dtype=q.dtype) for _ in range(2))  # [hot | records | chunk]
        tile = torch.empty(H * min(n_rec, TILE_TOKENS) * d, dtype=torch.float32)
        for c, kern, pool, hot, own, x in ((view.k_codec, c_k, view.k_pool, view.k_hot, k, keys),
                                           (view.v_codec, c_v, view.v_pool, view.v_hot, v, values)):
            x[:, :nh] = hot[slot][:, hidx]
            for t0 in range(0, n_rec, TILE_TOKENS):  # records decoded a tile at a time: bounded memory
                t1 = min(n_rec, t0 + TILE_TOKENS)
                rot = kern.values_rotated(pool, table, S + t0, t1 - t0, tile[:H * (t1 - t0) * d].view(H, t1 - t0, d))
                x[:, nh + t0:nh + t1] = c.unrotate(rot.transpose(0, 1)).transpose(0, 1)
            x[:, p:] = own.transpose(0, 1)
        return sdpa(q, keys, values, causal_mask(p, n, None, q.device), scale)
    keys = torch.cat([x.to(q.dtype) for x in keys] + [k.transpose(0, 1).to(q.dtype)], 1)
    values = torch.cat([x.to(q.dtype) for x in values] + [v.transpose(0, 1).to(q.dtype)], 1)
    return sdpa(q, keys, values, causal_mask(p, n, None, q.device), scale)


def paged_attention(q, k, v, cu_q, prefix_lens, view, scale: float, window: int | None = None,
                    prefix_list: list[int] | None = None, chunk_list: list[int] | None = None,
                    enter: torch.Tensor | None = None) -> torch.Tensor:
    """q [T, Hq, d], k/v [T, H, d] (the chunks' own tokens) -> [T, Hq, d] in q's dtype.

    Each chunk attends causally to itself and to its sequence's cached prefix (LayerCacheView). enter
    (decode steps, int64 [B]): afterwards the new tokens take hot rows enter of their sequences
    (enter_window; the decode kernel's merge does it in place)."""
    T, Hq, d = q.shape
    H = k.shape[1]
    G = Hq // H
    out = torch.empty_like(q)
    cu = cu_q.tolist()
    prefixes = prefix_list if prefix_list is not None else prefix_lens.tolist()
    slots = view.seq_slot.tolist()
    S, W = view.sinks, view.window
    for row, (s0, s1, p) in enumerate(zip(cu[:-1], cu[1:], prefixes)):
        n = s1 - s0
        if n == 1 and window is None and view.k_hot is not None:
            out[s0] = _decode_row(q[s0], k[s0], v[s0], view, row, slots[row], p, scale).to(q.dtype)
            continue
        if n > 1 and window is None and q.device.type == "cpu" and cpu.dispatch.kernels_enabled():
            fast = _prefill_sdpa(q[s0:s1], k[s0:s1], v[s0:s1], view, row, slots[row], p, scale)
            if fast is not None:
                out[s0:s1] = fast
                continue
        qpos = torch.arange(p, p + n, device=q.device)
        qg = q[s0:s1].float().view(n, H, G, d).transpose(1, 2)  # [n, G, H, d]: head h = kv * G + g
        merger = _Merger()
        _dense_part(qg, k[s0:s1], v[s0:s1], qpos, qpos, scale, window, merger)
        if view.k_hot is None:
            t = torch.arange(p, device=q.device)
            if window is not None:
                t = t[t > p - window]
            bs = view.block_size
            flat = flat_slots(view.block_table[row], t, bs)
            _dense_part(qg, read_tokens(view.k_pool, flat, bs), read_tokens(view.v_pool, flat, bs),
                        qpos, t, scale, window, merger)
        else:
            hot_t, hidx = hot_rows(p, S, W, q.device)
            if window is not None:
                seen = hot_t > p - window
                hot_t, hidx = hot_t[seen], hidx[seen]
            slot = slots[row]
            _dense_part(qg, view.k_hot[slot, :, hidx].transpose(0, 1), view.v_hot[slot, :, hidx].transpose(0, 1),
                        qpos, hot_t, scale, window, merger)
            lo, hi = S, max(S, p - W)
            if window is not None:
                lo = max(lo, p - window + 1)
            _compressed_part(qg, view, row, lo, hi, qpos, scale, window, merger)
        out[s0:s1] = merger.result().transpose(1, 2).reshape(n, Hq, d).to(q.dtype)
    if enter is not None:
        enter_window(view.k_hot, view.v_hot, k, v, view.seq_slot.long(), enter)
    return out
