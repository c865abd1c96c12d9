"""LLMEngine: runs forward steps of a model over a cache for a batch of sequence chunks.

A decode step (one new token per sequence) on CUDA runs as one CUDA graph per batch size: the
step's integers (token ids, positions, the cache's write plan) go to the device in one copy into
the graph's static input buffer, and a replay runs every layer's projections, attention kernels
and cache writes with no host work in between. The first step of a batch size runs eagerly (it is
also the warm-up: kernel compiles, codec layouts) and is then captured for the next ones.
"""

from __future__ import annotations

import os
import threading
import warnings

import torch

from tqinfer.engine.context import StepContext, set_context, step_meta
from tqinfer.errors import Cancelled
from tqinfer.kernels import dispatch


class LLMEngine:
    def __init__(self, model, cache, device, cuda_graphs: bool | None = None):
        self.model = model
        self.cache = cache
        self.device = torch.device(device)
        self.lock = threading.Lock()  # several streams may share the engine; steps run one at a time
        if cuda_graphs is None:
            cuda_graphs = os.environ.get("TQINFER_CUDA_GRAPHS", "1") != "0"
        self.cuda_graphs = cuda_graphs and self._graph_ready()
        self.graphs: dict[int, DecodeGraph] = {}
        self.graph_pool = None

    def _graph_ready(self) -> bool:
        args = self.model.args  # (the torch twins read host values: no capture without the kernels)
        return (self.device.type == "cuda" and dispatch.kernels_enabled() and args.sliding_window is None
                and self.cache.graph_ready(args.head_dim))

    @torch.inference_mode()
    def forward(self, slots: list[int], prefix_lens: list[int], chunks: list[list[int]],
                all_logits: bool = False, cancel=None) -> torch.Tensor:
        """Run one step: chunk i (token ids) of sequence `slots[i]` starts at prefix_lens[i].

        Returns fp32 logits: for every token when all_logits, else for each chunk's last token.
        cancel (a threading.Event): set while an eager step runs, it stops between layers with
        errors.Cancelled, and the cache's step state is put back (the layers that ran had moved
        tokens out of the sequences' windows, or calibrated on a first chunk); the lengths stay, so
        the cache reads as it did before the step."""
        lens = [len(c) for c in chunks]
        ids = [t for c in chunks for t in c]
        with self.lock:
            meta, decode = step_meta(self.cache, slots, prefix_lens, lens)
            meta = ids + meta
            graph = self.graphs.get(len(slots)) if decode and self.cuda_graphs else None
            if graph is not None and graph.valid():
                logits = graph.replay(meta).clone()
            else:
                saved = self.cache.step_state(slots) if cancel is not None else None
                try:
                    logits = self._eager(slots, prefix_lens, lens, meta, all_logits, cancel)
                except Cancelled:
                    self.cache.restore_step_state(slots, saved)
                    raise
                if decode and self.cuda_graphs:
                    self._capture(slots, prefix_lens, meta)
            for slot, prefix, n in zip(slots, prefix_lens, lens):
                self.cache.set_len(slot, prefix + n)
        return logits

    def _capture(self, slots, prefix_lens, meta) -> None:
        try:
            self.graphs[len(slots)] = DecodeGraph(self, slots, prefix_lens, meta)
        except RuntimeError as e:  # a capture the driver refuses: keep running eagerly, say so once
            self.cuda_graphs = False
            warnings.warn(f"CUDA graph capture failed, decoding without graphs: {e}", stacklevel=3)

    def _eager(self, slots, prefix_lens, lens, meta, all_logits, cancel=None):
        t = sum(lens)
        buf = torch.tensor(meta, dtype=torch.long, device=self.device)  # one host-to-device copy
        ctx = StepContext.from_meta(self.cache, slots, prefix_lens, lens, buf[t:])
        index = None if all_logits else (ctx.cu_q[1:] - 1).long()
        set_context(ctx)
        try:
            return self.model(buf[:t], ctx.positions_t, index, max(p + n for p, n in zip(prefix_lens, lens)) - 1,
                              stop=cancel)
        finally:
            set_context(None)


class DecodeGraph:
    """One batch size's decode step, captured. Inputs: a static int64 buffer laid out like the eager
    step's metadata (ids, positions, prefix lengths, slots, boundaries, the cache's write plan);
    output: a static logits buffer, overwritten by the next replay."""

    def __init__(self, engine: LLMEngine, slots, prefix_lens, meta: list[int]):
        model, cache = engine.model, engine.cache
        b = len(slots)
        self.rotary = rotary = model.model.rotary
        rotary.table(cache.max_len, engine.device, model.model.embed_tokens.weight.dtype)  # never regrown later
        self.table = rotary.cos
        self.cache = cache
        self.state = cache.kernel_state()  # the codec layouts the eager warm-up step just built
        self.held = cache.prepare_graph()  # what the capture reads for them and cannot copy to the device
        self.host = torch.empty(len(meta), dtype=torch.long, pin_memory=True)
        self.inputs = torch.tensor(meta, dtype=torch.long, device=engine.device)
        self.copied = torch.cuda.Event()
        if engine.graph_pool is None:
            engine.graph_pool = torch.cuda.graph_pool_handle()
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph, pool=engine.graph_pool):
                ctx = StepContext.from_meta(cache, slots, prefix_lens, [1] * b, self.inputs[b:])
                set_context(ctx)
                self.logits = model(self.inputs[:b], ctx.positions_t, None, cache.max_len - 1)
        finally:
            set_context(None)

    def valid(self) -> bool:
        """Replays read the RoPE table and the codec layouts captured with them: a regrown table, or a
        codec calibrated or loaded since (a saved session, a new split permutation), means a new capture."""
        return self.rotary.cos is self.table and all(
            a is b for a, b in zip(self.state, self.cache.kernel_state(), strict=True))

    def replay(self, meta: list[int]) -> torch.Tensor:
        self.copied.synchronize()  # the last step's copy has left the pinned buffer
        self.host.copy_(torch.tensor(meta, dtype=torch.long))
        self.inputs.copy_(self.host, non_blocking=True)
        self.copied.record()
        self.graph.replay()
        return self.logits
