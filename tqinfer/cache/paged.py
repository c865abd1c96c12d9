"""PagedCache: a static block pool of compressed records per layer, block tables per sequence,
and full-precision sinks + recent window per sequence.

Layout (the kernels read exactly this):
- k_pool[layer]: uint8 [num_blocks, H, BS, rec_k] (dense layers: model dtype [num_blocks, H, BS, d]);
  token t of sequence slot s lives in block block_table[s, t // BS] at offset t % BS.
- k_hot[layer]: model dtype [max_seqs, H, S + W, d]; token t < S at hot slot t, t >= S at
  S + (t - S) % W. A sequence of L tokens keeps [S, L - W) compressed in the pool, the rest hot.
- Records of a token are written once, when it leaves the window (quantize-on-write); `compressed`
  per sequence says how many leading tokens already have records, so a rollback never re-encodes.
  A planned decode step (CUDA) writes every layer's leaving tokens in one launch at its start
  (_retire), and each layer's attention stores the new token into the row the leaving one held.
- Key centering (CacheConfig.center_keys): k_center[layer] float32 [H, d] is a point per KV head
  chosen from the first prefill chunk (attention_weighted_center; calibrated with the split types'
  outlier sets and kept with the cache); "auto" (the default) keeps it only for the heads where it
  holds >= CENTER_AUTO_SHARE of the keys' energy, and zero (no centering) elsewhere. Every key the layer stores or attends to, hot
  or compressed or the chunk's own, is k - k_center: each query's scores all move by the same
  q . k_center, which softmax does not see, so attention over exact keys is unchanged while the codec
  quantizes k - k_center. Queries, values and the kernels are untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tqinfer.cache.config import DENSE, CacheConfig, bytes_per_token, fixed_bytes
from tqinfer.errors import CacheMemoryError


CPU_WRITE_AHEAD = 32
# key centering: a first prefill chunk with fewer tokens past the sinks leaves the keys uncentered;
# the center is weighed from the attention of at most CENTER_TOKENS of its tokens
MIN_CENTER_TOKENS = 16
CENTER_TOKENS = 512
# center_keys="auto" centers a KV head when its center holds at least this share of its keys' energy
# in the calibration chunk: 0.95-0.998 in Qwen2.5-0.5B's layers 0, 1, 2 and 8 (a k_proj bias), at most
# 0.82 on SmolLM2, where centering every head measured slightly worse (docs/QUALITY.md)
CENTER_AUTO_SHARE = 0.9


def center_share(k: torch.Tensor, center: torch.Tensor, sinks: int) -> torch.Tensor:
    """||center||^2 / mean ||k||^2 per KV head over the calibration tokens past the sinks (those the
    center was weighed from): k [T, H, d], center [H, d] -> float32 [H]."""
    kf = k[sinks:CENTER_TOKENS].float()
    return center.pow(2).sum(-1) / kf.pow(2).sum(-1).mean(0).clamp_min(1e-30)


def attention_weighted_center(q: torch.Tensor, k: torch.Tensor, scale: float, sinks: int) -> torch.Tensor:
    """The point a layer's keys are stored relative to (key centering), from one sequence's first
    prefill chunk q [T, Hq, d], k [T, H, d] (positions 0..T-1): per KV head, the mean of the keys
    weighted by the attention each receives from the chunk's queries (causal softmax, the heads of
    its group summed), the sinks, which stay exact, left out -> float32 [H, d]; zeros when the chunk
    has fewer than MIN_CENTER_TOKENS tokens past the sinks.
    The quantization error of a key reaches attention's output in proportion to the attention the key
    gets, and the codec's error scales with the norm of what it encodes; the keys attention picks are
    often far from the plain mean of all keys (measured on SmolLM2, docs/QUALITY.md), so their weighted
    mean is the center that makes the picked keys small."""
    T = min(k.shape[0], CENTER_TOKENS)
    H, d = k.shape[1], k.shape[2]
    if T - sinks < MIN_CENTER_TOKENS:
        return torch.zeros(H, d, dtype=torch.float32, device=k.device)
    kf = k[:T].float()
    qg = q[:T].float().view(T, H, -1, d)
    s = torch.einsum("nhgd,mhd->hgnm", qg, kf) * scale
    t = torch.arange(T, device=k.device)
    s = s.masked_fill(t[None, :] > t[:, None], float("-inf"))
    w = torch.softmax(s, -1).sum((1, 2))  # [H, T]: attention each key gets
    w[:, :sinks] = 0
    c = torch.einsum("hm,mhd->hd", w, kf) / w.sum(-1, keepdim=True)
    return c if bool(torch.isfinite(c).all()) else torch.zeros_like(c)


@dataclass
class LayerCacheView:
    """What attention over one layer's cache needs (shared by the torch twin and the kernels)."""

    k_pool: torch.Tensor
    v_pool: torch.Tensor
    k_hot: torch.Tensor | None
    v_hot: torch.Tensor | None
    block_table: torch.Tensor  # int32 [B, max_blocks] rows of the step's sequences
    seq_slot: torch.Tensor  # int32 [B] hot-buffer row of each sequence
    sinks: int
    window: int
    block_size: int
    k_codec: object | None  # KVCodec, None for a dense layer
    v_codec: object | None

    @property
    def dense(self) -> bool:
        """Both pools dense and no hot buffers (a protected layer)."""
        return self.k_hot is None


def codec_seed(seed: int, layer: int, which: str) -> int:
    """One rotation per (seed, layer, K|V), shared by the layer's KV heads."""
    return (seed * 1_000_003 + layer * 2 + (which == "v")) & 0x7FFFFFFF


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


class PagedCache:
    kind = "paged"

    def __init__(self, config: CacheConfig, args, *, max_seqs: int, max_len: int, dtype, device,
                 num_blocks: int | None = None):
        from tqinfer.quant.registry import make_codec

        self.config, self.args = config, args
        self.device, self.dtype = torch.device(device), dtype
        self.max_seqs, self.max_len = max_seqs, max_len
        L, H, d, BS = args.num_hidden_layers, args.num_key_value_heads, args.head_dim, config.block_size
        self.block_size = BS
        self.blocks_per_seq = -(-max_len // BS)
        self.num_blocks = num_blocks or max_seqs * self.blocks_per_seq
        self.scratch_block = self.num_blocks  # one more block, never handed out: decode-plan no-op writes
        self.sinks, self.window = config.sinks, config.window
        # records written ahead per window exit: one by one where a decode step is a CUDA graph (a
        # static shape), in batches on the CPU, where each encode call costs far more than its work
        self.write_ahead = 1 if self.device.type == "cuda" else CPU_WRITE_AHEAD
        need = (self.num_blocks + 1) * BS * bytes_per_token(args, config, dtype) + max_seqs * fixed_bytes(args, config, dtype)
        free = available_memory(self.device)
        if need > free:
            raise CacheMemoryError(
                f"the KV cache for {max_seqs} x {max_len} tokens ({config.label}) needs "
                f"{need / 2**20:.1f} MiB but only {free / 2**20:.1f} MiB is free on {self.device}; "
                f"use a smaller -c or a smaller cache type (tqinfer estimate shows the options)"
            )
        self.k_codec, self.v_codec, self.k_pool, self.v_pool, self.k_hot, self.v_hot = [], [], [], [], [], []
        self.k_center: list[torch.Tensor | None] = []  # key centering, per layer with compressed keys
        self.center_on = [False] * L  # a layer's center is not all zeros (else its keys are stored as is)
        hot = config.sinks + config.window
        for layer in range(L):
            kt, vt = config.layer_types(layer, L)
            for which, name, codecs, pools in (("k", kt, self.k_codec, self.k_pool), ("v", vt, self.v_codec, self.v_pool)):
                if name == DENSE:
                    codecs.append(None)
                    pools.append(torch.zeros(self.num_blocks + 1, H, BS, d, dtype=dtype, device=self.device))
                else:
                    codec = make_codec(name, d, H, seed=codec_seed(config.seed, layer, which),
                                       rotation=config.rotation, rope_pairs=which == "k")
                    codecs.append(codec)
                    pools.append(torch.zeros(self.num_blocks + 1, H, BS, codec.record_bytes, dtype=torch.uint8,
                                             device=self.device))
            compressed = (kt, vt) != (DENSE, DENSE)
            center = config.center_keys != "off" and kt != DENSE
            self.k_center.append(torch.zeros(H, d, dtype=torch.float32, device=self.device) if center else None)
            self.k_hot.append(torch.zeros(max_seqs, H, hot, d, dtype=dtype, device=self.device) if compressed else None)
            self.v_hot.append(torch.zeros(max_seqs, H, hot, d, dtype=dtype, device=self.device) if compressed else None)
        self.block_table = torch.zeros(max_seqs, self.blocks_per_seq, dtype=torch.int32, device=self.device)
        self.tables: list[list[int]] = [[] for _ in range(max_seqs)]
        self.free_blocks = list(range(self.num_blocks))[::-1]
        self.lens = [0] * max_seqs
        self.compressed = [0] * max_seqs  # leading tokens that already have records
        self.calibrated = [False] * L
        self.hot_layers = [i for i in range(L) if self.k_hot[i] is not None]  # layers with compressed records
        self.retired = False  # this decode step's window exits written for every layer at its start (_retire)

    # --- blocks -----------------------------------------------------------------------------
    def reserve(self, slot: int, n: int) -> None:
        """Make sure sequence `slot` has blocks for n tokens."""
        if n > self.max_len:
            raise CacheMemoryError(f"{n} tokens exceed the cache's context of {self.max_len}")
        table = self.tables[slot]
        need = -(-n // self.block_size)
        if need - len(table) > len(self.free_blocks):
            raise CacheMemoryError(
                f"out of cache blocks: sequence needs {need - len(table)} more, {len(self.free_blocks)} free"
            )
        while len(table) < need:
            block = self.free_blocks.pop()
            self.block_table[slot, len(table)] = block
            table.append(block)

    def blocks_needed(self, n: int) -> int:
        return -(-n // self.block_size)

    def free_block_count(self) -> int:
        return len(self.free_blocks)

    def set_len(self, slot: int, n: int) -> None:
        """The sequence now holds n tokens (after a step, or 0 to free it). Growing it marks the
        tokens that left the window during the step as having records."""
        if n == 0:
            self.free_blocks.extend(reversed(self.tables[slot]))
            self.tables[slot] = []
            self.compressed[slot] = 0
        elif n > self.lens[slot]:
            self.compressed[slot] = max(self.compressed[slot], self._record_range(slot, n)[1])
        self.lens[slot] = n

    def _record_range(self, slot: int, end: int) -> tuple[int, int]:
        """Tokens [first, upto) of a sequence growing to `end` tokens that get their records in this
        step: those leaving the recent window, and when any does, up to write_ahead - 1 more of the
        window written ahead (attention still reads them from the hot buffer until they leave it; the
        records of a token are the same bytes whenever they are written). The same integers for
        every layer of the step and for set_len after it."""
        first = max(self.sinks, self.compressed[slot])
        upto = max(first, end - self.window)
        if upto > first:
            upto = max(upto, min(end, first + self.write_ahead))
        return first, upto

    def step_state(self, slots: list[int]) -> dict:
        """What a step that stops midway must put back (restore_step_state): these sequences' hot
        buffers (sinks and recent window) in every compressed layer, and which layers are calibrated
        (a stopped first chunk must not leave some layers calibrated on it and the rest on the next
        prompt). Nothing else: the step's records lie at or past each sequence's `compressed` mark or
        length, and are written again before anything reads them; blocks it reserved stay reserved."""
        index = torch.tensor(slots, device=self.device)
        return {"calibrated": list(self.calibrated),
                "hot": [(layer, kh[index].clone(), vh[index].clone())
                        for layer, (kh, vh) in enumerate(zip(self.k_hot, self.v_hot)) if kh is not None]}

    def restore_step_state(self, slots: list[int], saved: dict) -> None:
        index = torch.tensor(slots, device=self.device)
        for layer, kh, vh in saved["hot"]:
            self.k_hot[layer][index] = kh
            self.v_hot[layer][index] = vh
        self.calibrated[:] = saved["calibrated"]

    def truncate(self, slot: int, n: int) -> None:
        """Roll a sequence back to n tokens. Window tokens that had already left it are restored to
        the hot buffer from their records (their exact values are gone)."""
        old = self.lens[slot]
        if n >= old:
            return
        if n == 0:
            return self.set_len(slot, 0)
        S, W = self.sinks, self.window
        lost = range(max(S, n - W), min(n, max(S, old - W)))
        if len(lost) and W > 0:
            t = torch.arange(lost.start, lost.stop, device=self.device)
            flat = flat_slots(self.block_table[slot], t, self.block_size)
            hot_idx = S + (t - S) % W
            for layer in range(self.args.num_hidden_layers):
                for codec, pool, hot in ((self.k_codec[layer], self.k_pool[layer], self.k_hot[layer]),
                                         (self.v_codec[layer], self.v_pool[layer], self.v_hot[layer])):
                    if hot is None:
                        continue
                    x = read_tokens(pool, flat, self.block_size)  # [N, H, rec | d]
                    x = x.to(torch.float32) if codec is None else codec.decode(x)
                    hot[slot, :, hot_idx] = x.transpose(0, 1).to(hot.dtype)
        keep = -(-n // self.block_size)
        self.free_blocks.extend(reversed(self.tables[slot][keep:]))
        del self.tables[slot][keep:]
        self.compressed[slot] = min(self.compressed[slot], n)
        self.lens[slot] = n

    # --- attention and writes -----------------------------------------------------------------
    def view(self, layer: int, ctx) -> LayerCacheView:
        """The layer's cache as the step's sequences see it (block rows gathered once per step)."""
        dense = self.k_hot[layer] is None
        return LayerCacheView(self.k_pool[layer], self.v_pool[layer], self.k_hot[layer], self.v_hot[layer],
                              ctx.block_rows, ctx.seq_slot_t, 0 if dense else self.sinks,
                              0 if dense else self.window, self.block_size, self.k_codec[layer], self.v_codec[layer])

    def attend(self, layer, q, k, v, ctx, scale, window):
        from tqinfer.kernels import dispatch

        if not ctx.decode:  # (a decode step's plan reserved its blocks)
            for slot, prefix, n in zip(ctx.slots, ctx.prefix_lens, ctx.chunk_lens):
                self.reserve(slot, prefix + n)  # a no-op after the step's first layer
        if not self.calibrated[layer]:
            self._calibrate(layer, q, k, v, ctx, scale)
        k = self.centered(layer, k)
        enter = None
        if ctx.decode and self.window > 0 and self.k_hot[layer] is not None:
            self._retire(layer, ctx.seq_index, ctx.plan)
            enter = ctx.plan[0]  # the new tokens take their hot rows once attention has read them
        out = dispatch.paged_attention(q, k, v, ctx.cu_q, ctx.prefix_lens_t, self.view(layer, ctx), scale, window,
                                       prefix_list=ctx.prefix_lens, chunk_list=ctx.chunk_lens, enter=enter)
        if ctx.decode:
            self._write_decode(layer, k, v, ctx.plan)
        else:
            self._write(layer, k, v, ctx)
        return out

    # --- decode steps: a write plan made on the host, applied by device ops alone ---------------
    def decode_plan(self, slots: list[int], prefix_lens: list[int]) -> list[int] | None:
        """Reserve a block for each sequence's new token and say where its writes go, as int rows
        [hot_new, src_hot, rec_dst, dense_dst] (flattened): the new token's hot slot; the token
        leaving the recent window (hot slot -> records at flat pool slot rec_dst, or a no-op write
        to the scratch block); the new token's flat pool slot (dense layers). None where the generic
        path serves decode steps: sinks without a recent window, and records written ahead in
        batches (the CPU's write_ahead)."""
        S, W, BS = self.sinks, self.window, self.block_size
        if (W == 0 and S > 0) or self.write_ahead > 1:
            return None
        scratch = self.scratch_block * BS
        rows = [[], [], [], []]
        for slot, p in zip(slots, prefix_lens):
            self.reserve(slot, p + 1)
            table = self.tables[slot]
            t = p - W  # leaves the window now, unless it is a sink or already has records
            leaves = W > 0 and t >= max(S, self.compressed[slot])
            rows[0].append(p if p < S else (S + (p - S) % W if W else 0))
            rows[1].append(S + (t - S) % W if leaves else 0)
            rows[2].append(table[t // BS] * BS + t % BS if leaves else scratch)
            rows[3].append(table[p // BS] * BS + p % BS)
        if W == 0:  # no hot buffers (S == 0 too): every token goes to the pool as it comes
            rows[2] = rows[3]
        return [i for row in rows for i in row]

    def _retire(self, layer: int, seq: torch.Tensor, plan: torch.Tensor) -> None:
        """A decode step's records of the tokens leaving the window (hot rows plan[1] -> pool slots
        plan[2]), before the layer's attention, which then writes the new tokens into those rows: at
        the step's first layer with a window, every layer's at once (one launch where the layers
        share a cache type, in place of a write per layer; records are the same bytes whenever
        written, and no attention of this step reads them: its window still holds the token). While a
        layer is yet to be calibrated (a first step of one token), each layer its own, after its
        calibration."""
        from tqinfer.kernels import dispatch

        _, src_hot, rec_dst, _ = plan
        if layer == self.hot_layers[0]:
            self.retired = all(self.calibrated[i] for i in self.hot_layers)
            if self.retired:
                dispatch.retire_window(self._retire_layers(self.hot_layers), seq, src_hot, rec_dst)
        if not self.retired:
            dispatch.retire_window(self._retire_layers([layer]), seq, src_hot, rec_dst)

    def _retire_layers(self, layers: list[int]) -> list[tuple]:
        """retire_window's (k_codec, v_codec, k_hot, v_hot, k_pool, v_pool) of these layers."""
        return [(self.k_codec[i], self.v_codec[i], self.k_hot[i], self.v_hot[i], self.k_pool[i], self.v_pool[i])
                for i in layers]

    def prepare_graph(self) -> list:
        """Host work a decode step's capture must not do (copies to the device): the tables of the
        layers' tensors retire_window reads, for the codec layouts of now; the graph holds them."""
        from tqinfer.kernels import dispatch

        if self.window > 0 and self.hot_layers:
            return dispatch.prepare_retire(self._retire_layers(self.hot_layers))
        return []

    def _write_decode(self, layer: int, k: torch.Tensor, v: torch.Tensor, plan: torch.Tensor) -> None:
        """A decode step's writes after the layer's attention, where a layer has no window: the new token
        to the pool (dense layers; records where the window is empty). With a window, _retire wrote the
        records before attention and attention the new token."""
        from tqinfer.kernels import dispatch

        _, _, rec_dst, dense_dst = plan
        if self.k_hot[layer] is None:
            write_dense(self.k_pool[layer], k, dense_dst, self.block_size)
            write_dense(self.v_pool[layer], v, dense_dst, self.block_size)
        elif self.window == 0:
            dispatch.write_kv_tokens(self.k_codec[layer], k, self.k_pool[layer], self.v_codec[layer], v,
                                     self.v_pool[layer], rec_dst)

    def kernel_state(self) -> list:
        """What a captured decode step depends on beside the pools: each codec's layout state (a split
        codec's channel permutation, replaced by calibration and by loading a saved sequence; a graph
        captured under other state would read freed layout tensors) and which layers center their
        keys (tqinfer/engine/engine.py)."""
        from tqinfer.kernels.quantize import layout_state

        return [layout_state(c) for c in self.k_codec + self.v_codec] + self.center_on

    def graph_ready(self, head_dim: int) -> bool:
        """Whether a decode step runs entirely on the device (fused kernels for every layer, a
        planned write), so it can be captured in a CUDA graph."""
        if self.device.type != "cuda" or (self.window == 0 and self.sinks > 0):
            return False
        from tqinfer.kernels.decode_attention import MAX_HEAD_DIM
        from tqinfer.kernels.quantize import supports

        return head_dim <= MAX_HEAD_DIM and all(supports(c) for c in self.k_codec + self.v_codec)

    def centered(self, layer: int, k: torch.Tensor) -> torch.Tensor:
        """Keys [..., H, d] as the layer stores them: k - k_center[layer] (k itself where no head is
        centered: no work on a step's path for a zero center)."""
        return (k.float() - self.k_center[layer]).to(k.dtype) if self.center_on[layer] else k

    def set_center(self, layer: int, center: torch.Tensor) -> None:
        """A layer's key center (calibrated, or a loaded sequence's), written in place: a decode graph
        reads the tensor, and whether the layer is centered at all is part of kernel_state."""
        self.k_center[layer].copy_(center)
        self.center_on[layer] = bool(self.k_center[layer].any())

    def _calibrate(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx, scale: float) -> None:
        """From the first prefill chunk: the key center (key centering, from its first sequence), then
        the split types' outlier channels per KV head, chosen on the keys as stored (centered), and the
        query energy of query-aware rounding (CacheConfig.query_aware: the K codecs that have it, where
        records are written by the torch encode; the fused CUDA write kernels round to the nearest)."""
        from tqinfer.kernels import dispatch

        center = self.k_center[layer]
        n = ctx.chunk_lens[0]
        kc = self.k_codec[layer]
        if self.config.query_aware and hasattr(kc, "calibrate_queries") and not dispatch.use_triton(k):
            kc.calibrate_queries(q[:n])
        if center is not None:
            c = attention_weighted_center(q[:n], k[:n], scale, self.sinks)
            if self.config.center_keys == "auto":  # only the heads a shared offset dominates
                c = c * (center_share(k[:n], c, self.sinks) >= CENTER_AUTO_SHARE)[:, None]
            self.set_center(layer, c)
            k = self.centered(layer, k)
        for codec, x in ((self.k_codec[layer], k), (self.v_codec[layer], v)):
            if codec is not None and getattr(codec, "needs_calibration", False):
                codec.calibrate(x.float())
        self.calibrated[layer] = True

    def _write(self, layer: int, k: torch.Tensor, v: torch.Tensor, ctx) -> None:
        from tqinfer.kernels import dispatch

        S, W, BS = self.sinks, self.window, self.block_size
        khot, vhot = self.k_hot[layer], self.v_hot[layer]
        start = 0
        for slot, p, n in zip(ctx.slots, ctx.prefix_lens, ctx.chunk_lens):
            end = p + n
            kc, vc = k[start:start + n], v[start:start + n]
            start += n
            table = self.block_table[slot]
            if khot is None:  # dense layer: every token to the pool
                flat = flat_slots(table, torch.arange(p, end, device=self.device), BS)
                write_dense(self.k_pool[layer], kc, flat, BS)
                write_dense(self.v_pool[layer], vc, flat, BS)
                continue
            # tokens that get records now: those leaving (or never entering) the window; the ranges
            # are host integers, so a step issues no device sync here
            first, upto = self._record_range(slot, end)
            if upto > first:
                dev = self.device
                xs_k, xs_v = [], []
                if first < min(upto, p):  # already cached: from the hot buffer
                    th = torch.arange(first, min(upto, p), device=dev)
                    hidx = S + (th - S) % W
                    xs_k.append(khot[slot, :, hidx].transpose(0, 1))
                    xs_v.append(vhot[slot, :, hidx].transpose(0, 1))
                if max(first, p) < upto:  # this chunk's own tokens
                    xs_k.append(kc[max(first, p) - p:upto - p])
                    xs_v.append(vc[max(first, p) - p:upto - p])
                flat = flat_slots(table, torch.arange(first, upto, device=dev), BS)
                dispatch.write_kv_tokens(self.k_codec[layer], torch.cat(xs_k), self.k_pool[layer],
                                         self.v_codec[layer], torch.cat(xs_v), self.v_pool[layer], flat)
            # the chunk's tokens that stay full precision: sinks and the last W
            if n == 1:  # a decode token (the CPU's steps): its hot row by host integers, two copies
                if p < S or W > 0:
                    row = p if p < S else S + (p - S) % W
                    khot[slot, :, row] = kc[0]
                    vhot[slot, :, row] = vc[0]
                continue
            tk, hidx = hot_rows(end, S, W, self.device, start=p)  # the chunk's tokens that stay hot
            if tk.numel():
                khot[slot, :, hidx] = kc[tk - p].transpose(0, 1).to(khot.dtype)
                vhot[slot, :, hidx] = vc[tk - p].transpose(0, 1).to(vhot.dtype)

    # --- accounting -------------------------------------------------------------------------
    def nbytes(self) -> int:
        tensors = self.k_pool + self.v_pool + [t for t in self.k_hot + self.v_hot if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def seq_nbytes(self, slot: int) -> int:
        """Bytes this sequence's tokens take: records of compressed tokens, full precision for the
        sinks and the recent window (and for every token of a protected layer)."""
        n = self.lens[slot]
        n_hot = min(n, self.sinks) + max(0, min(self.window, n - self.sinks))
        n_comp = n - n_hot
        H, d = self.args.num_key_value_heads, self.args.head_dim
        dense_vec = d * torch.finfo(self.dtype).bits // 8
        total = 0
        for layer in range(self.args.num_hidden_layers):
            kc, vc = self.k_codec[layer], self.v_codec[layer]
            rk = dense_vec if kc is None else kc.record_bytes
            rv = dense_vec if vc is None else vc.record_bytes
            if self.k_hot[layer] is None:
                total += H * n * (rk + rv)
            else:
                total += H * (n_comp * (rk + rv) + n_hot * 2 * dense_vec)
        return total


def flat_slots(table_row: torch.Tensor, t: torch.Tensor, block_size: int) -> torch.Tensor:
    """Token positions t of one sequence -> flat pool slots block * BS + offset (int64)."""
    return table_row[t // block_size].long() * block_size + t % block_size


def hot_rows(p: int, S: int, W: int, device, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions >= start that a sequence of p tokens keeps in its hot buffer (its sinks, then its
    last W tokens past them) and their rows there (the window's rows are a ring)."""
    lo_w = max(S, p - W, start)  # built on the device: a copy from pageable host memory waits for the stream
    hot_t = torch.cat([torch.arange(start, max(start, min(S, p)), device=device),
                       torch.arange(lo_w, max(lo_w, p), device=device)])
    return hot_t, torch.where(hot_t < S, hot_t, S + (hot_t - S) % max(W, 1))


def read_tokens(pool: torch.Tensor, flat: torch.Tensor, block_size: int) -> torch.Tensor:
    """pool [NB, H, BS, r] at flat token indices [N] -> [N, H, r]."""
    return pool[flat // block_size, :, flat % block_size]


def write_dense(pool: torch.Tensor, x: torch.Tensor, flat: torch.Tensor, block_size: int) -> None:
    pool[flat // block_size, :, flat % block_size] = x.to(pool.dtype)
