"""Llama-family decoder (llama 2/3, SmolLM2, mistral, qwen2, qwen3): the math only.

Tokens of all sequences in a step are flattened into one [T] batch; attention goes through
`tqinfer.attention.attention`, which reads the step context, so this file never sees a cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from tqinfer.attention import attention
from tqinfer.errors import Cancelled
from tqinfer.kernels import fused, reference


@dataclass
class ModelArgs:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: int = 0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    hidden_act: str = "silu"

    @classmethod
    def from_dict(cls, config: dict) -> "ModelArgs":
        known = {f.name for f in fields(cls)}
        args = cls(**{k: v for k, v in config.items() if k in known})
        if "rope_parameters" in config and not args.rope_scaling:  # transformers >= 5 naming
            rp = config["rope_parameters"] or {}
            args.rope_theta = rp.get("rope_theta", args.rope_theta)
            if rp.get("rope_type", "default") != "default":
                args.rope_scaling = rp
        if args.model_type == "qwen2":
            args.attention_bias = True
        if args.model_type == "qwen3":
            args.qk_norm = True
        if args.model_type in ("qwen2", "qwen3") and not config.get("use_sliding_window", False):
            args.sliding_window = None
        args.num_key_value_heads = args.num_key_value_heads or args.num_attention_heads
        args.head_dim = args.head_dim or args.hidden_size // args.num_attention_heads
        if args.hidden_act not in ("silu", "swish"):
            raise ValueError(f"unsupported hidden_act {args.hidden_act!r} (supported: silu)")
        return args


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies with the config's rope scaling (default, linear, llama3)."""
    d = args.head_dim
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64, device="cpu") / d))
    scaling = args.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / scaling["factor"]
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(is_mid, mid, scaled)
    raise ValueError(f"unsupported rope scaling {kind!r} (supported: default, linear, llama3)")


class RotaryEmbedding(nn.Module):
    """rotate_half RoPE with a precomputed cos/sin table."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.inv_freq = rope_inv_freq(args)
        self.max_len = 0
        self.cos = self.sin = None

    def table(self, n: int, device, dtype):
        if self.cos is None or n > self.max_len or self.cos.device != torch.device(device) or self.cos.dtype != dtype:
            n = max(n, 2 * self.max_len, 4096)  # grow geometrically: decode asks for one more each step
            t = torch.arange(n, dtype=torch.float64, device="cpu")
            freqs = torch.outer(t, self.inv_freq)
            emb = torch.cat([freqs, freqs], dim=-1)
            self.cos, self.sin = emb.cos().to(device, dtype), emb.sin().to(device, dtype)
            self.max_len = n
        return self.cos, self.sin

    def cos_sin(self, positions: torch.Tensor, max_position: int, dtype) -> "Rope":
        """The step's rotary embedding for positions [T]; once per forward, shared by every layer."""
        cos, sin = self.table(max_position + 1, positions.device, dtype)
        return Rope(positions, cos, sin)


class Rope:
    """A step's positions and the cos/sin tables; cos/sin [T, 1, d] gathered on first use (the
    unfused path), the fused kernel reads the tables directly."""

    def __init__(self, positions, cos_table, sin_table):
        self.positions, self.cos_table, self.sin_table = positions, cos_table, sin_table
        self._gathered = None

    def gathered(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._gathered is None:
            p = self.positions
            self._gathered = self.cos_table[p].unsqueeze(1), self.sin_table[p].unsqueeze(1)
        return self._gathered


apply_rope = fused.rope_torch  # x [T, heads, d] rotated (rotate_half convention)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict names) whose decode-step products on CUDA go through
    fused.linear's kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused.linear(x, self.weight, self.bias)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        d, hd, bias = args.hidden_size, args.head_dim, args.attention_bias
        self.q_proj = Linear(d, self.n_heads * hd, bias=bias)
        self.k_proj = Linear(d, self.n_kv * hd, bias=bias)
        self.v_proj = Linear(d, self.n_kv * hd, bias=bias)
        self.o_proj = Linear(self.n_heads * hd, d, bias=False)
        if args.qk_norm:
            self.q_norm = RMSNorm(hd, args.rms_norm_eps)
            self.k_norm = RMSNorm(hd, args.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.scale = hd**-0.5
        self.window = args.sliding_window

    def fuse(self) -> None:
        """One q/k/v projection (one GEMM a step instead of three); the separate ones are dropped."""
        parts = (self.q_proj, self.k_proj, self.v_proj)
        self.qkv_proj = fused_linear(parts)
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: torch.Tensor, rope: Rope) -> torch.Tensor:
        T, hd = x.shape[0], self.head_dim
        if hasattr(self, "qkv_proj") and self.q_norm is None:
            q, k, v = fused.rope_split(self.qkv_proj(x), rope.positions, rope.cos_table, rope.sin_table,
                                       self.n_heads, self.n_kv, hd, gathered=rope.gathered)
        else:
            if hasattr(self, "qkv_proj"):
                q, k, v = self.qkv_proj(x).split([self.n_heads * hd, self.n_kv * hd, self.n_kv * hd], -1)
            else:
                q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            q, k, v = q.view(T, self.n_heads, hd), k.view(T, self.n_kv, hd), v.reshape(T, self.n_kv, hd)
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = apply_rope(q, *rope.gathered()), apply_rope(k, *rope.gathered())
        out = attention(q, k, v, self.layer, self.scale, self.window)
        return self.o_proj(out.reshape(T, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        d, h, bias = args.hidden_size, args.intermediate_size, args.mlp_bias
        self.gate_proj = Linear(d, h, bias=bias)
        self.up_proj = Linear(d, h, bias=bias)
        self.down_proj = Linear(h, d, bias=bias)

    def fuse(self) -> None:
        """One gate/up projection, SiLU(gate) * up in one kernel."""
        self.gate_up_proj = fused_linear((self.gate_proj, self.up_proj))
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "gate_up_proj"):
            return self.down_proj(fused.silu_mul(self.gate_up_proj(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# Rows up to which HalfGemvLinear runs fp16 (measured, 2.3k-row layers of the default model, one
# thread: fp16 13.8 / 22.5 ms a step at 1 / 2 rows against bf16 29.5 / 49.1, but 88.5 against 54.4
# at 4 rows and 11x slower than bf16 at 512).
GEMV_ROWS = 2
_FP16_MAX = 65504.0


def _bf16_copy(w16: torch.Tensor) -> torch.Tensor:
    """fp16 weights (CPU) -> bf16 through this thread's reused fp32 / bf16 scratch (a direct fp16 ->
    bf16 copy runs ~1.5 ns an element here, through fp32 ~0.2). Valid until the next call."""
    scratch = reference.cpu_scratch(w16.device)
    f32 = scratch("bf16_copy.f32", w16.shape, torch.float32)
    return scratch("bf16_copy.bf16", w16.shape, torch.bfloat16).copy_(f32.copy_(w16))


class HalfGemvLinear(nn.Module):
    """A bf16 linear whose weights are held in fp16 on the CPU (they convert exactly: checked when
    built). torch's fp16 GEMV runs 2-2.5x faster than its bf16 GEMV on x86 CPUs, so up to GEMV_ROWS
    rows (decode) the product runs in fp16 with fp32 accumulation; beyond that (prefill) the weights
    are converted back to the exact bf16 values and the GEMM runs in bf16 as before (bit-identical).

    fp16 range: the input is scaled by `in_scale` (a power of two: exact above fp16's subnormals)
    and the fp16 output is checked for overflow when `guard` is set (inputs past 65504 overflow too
    and show up there); an overflowing row set is redone in bf16. Unguarded linears are those whose output the builder
    proved bounded (an RMSNorm'd input). Output: bf16, rounded from the fp16 result (rel ~2e-4
    before that rounding, the bf16 GEMV's own ~1.7e-3 after)."""

    def __init__(self, lin: nn.Linear, in_scale: float = 1.0, guard: bool = True,
                 weight16: torch.Tensor | None = None):
        super().__init__()
        self.out_dtype = lin.weight.dtype
        w16 = weight16 if weight16 is not None else lin.weight.detach().to(torch.float16)
        self.weight = nn.Parameter(w16, requires_grad=False)
        self.bias = lin.bias
        self.in_scale, self.guard = in_scale, guard
        self.in_features, self.out_features = lin.in_features, lin.out_features

    @staticmethod
    def exact(w: torch.Tensor) -> torch.Tensor | None:
        """bf16 weights as fp16 where fp16 holds every value exactly (range and subnormals), else
        None. (Compared through fp32: a direct fp16 -> bf16 copy is ~7x slower on CPUs.)"""
        if w.dtype != torch.bfloat16:
            return None
        w = w.detach()
        w16 = w.to(torch.float16)
        return w16 if torch.equal(w16.float(), w.float()) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= GEMV_ROWS:
            xh = x.to(torch.float16)
            if self.in_scale != 1.0:
                xh.mul_(self.in_scale)
            y = F.linear(xh, self.weight).to(self.out_dtype)
            # inf / NaN survive the cast, and a bf16 sum of finite values cannot overflow: one
            # reduction (2 us here, against 8 for isfinite().all())
            if not self.guard or math.isfinite(y.sum().item()):
                if self.in_scale != 1.0:
                    y.mul_(1.0 / self.in_scale)
                return y if self.bias is None else y + self.bias
        return F.linear(x, _bf16_copy(self.weight), self.bias)


def fused_linear(parts) -> Linear:
    """The linears of `parts` (same input) as one, outputs concatenated in order."""
    w = torch.cat([p.weight for p in parts])
    out = Linear(w.shape[1], w.shape[0], bias=parts[0].bias is not None, device=w.device, dtype=w.dtype)
    out.weight = nn.Parameter(w, requires_grad=False)
    if parts[0].bias is not None:
        out.bias = nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=False)
    return out


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.self_attn = Attention(args, layer)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x: torch.Tensor, h: torch.Tensor | None, rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
        """Residual stream x plus the previous layer's pending output h -> (x, this layer's output):
        each residual add is fused with the RMSNorm after it."""
        x, n = add_norm(x, h, self.input_layernorm)
        x, n = add_norm(x, self.self_attn(n, rope), self.post_attention_layernorm)
        return x, self.mlp(n)


def add_norm(x: torch.Tensor, h: torch.Tensor | None, norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
    return fused.add_rms_norm(x, h, norm.weight, norm.eps)


class Backbone(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.rotary = RotaryEmbedding(args)
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Parameter names follow Hugging Face, so a safetensors state dict loads as it is."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Backbone(args)
        self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, logits_index: torch.Tensor | None = None,
                max_position: int | None = None, stop=None):
        """input_ids, positions [T] -> logits [len(logits_index) or T, vocab] (fp32).
        max_position (a host int) spares a device sync when given. stop: a threading.Event looked at
        before every layer; once set, the step raises errors.Cancelled (a long prompt's chunk takes
        seconds on a CPU: Esc must not wait for it)."""
        x = self.model.embed_tokens(input_ids).to(self.model.norm.weight.dtype)  # (an fp16 head's table)
        if max_position is None:
            max_position = int(positions.max())
        rope = self.model.rotary.cos_sin(positions, max_position, x.dtype)
        h = None
        for layer in self.model.layers:
            if stop is not None and stop.is_set():
                raise Cancelled("stopped while reading the prompt")
            x, h = layer(x, h, rope)
        if logits_index is not None:
            x, h = x[logits_index], h[logits_index]
        n = add_norm(x, h, self.model.norm)[1]
        return self.lm_head(n.to(self.lm_head.weight.dtype)).float()

    def fp16_head(self) -> bool:
        """Hold the output projection (and the embedding it is tied to) in fp16, where that is exact:
        on CPUs, torch's fp16 GEMV of the 49k x 576 head runs 2.3-3x faster than bf16 (1.8-2.0 vs
        4.6-6.1 ms on 2 cores, `scripts/bench_cpu.py --head`), and its logits are nearer an fp32
        head's. bf16 weights convert exactly unless a value leaves fp16's range; then nothing
        changes (returns False)."""
        w = self.lm_head.weight
        w16 = HalfGemvLinear.exact(w)
        if w16 is None:
            return False
        tied = self.model.embed_tokens.weight is w
        self.lm_head.weight = nn.Parameter(w16, requires_grad=False)
        if tied:
            self.model.embed_tokens.weight = self.lm_head.weight
        return True

    def half_gemv_linears(self) -> int:
        """CPU decode: every layer's projections as HalfGemvLinear (fp16 weights, fp16 GEMV for
        decode rows, the exact bf16 GEMM for prefill), where the bf16 weights convert exactly; call
        after fuse(). Returns how many were converted. fp16 range, per projection: q/k/v and gate/up
        read an RMSNorm'd vector n (||n|| <= sqrt(D) max|g|), so |output| <= sqrt(D) max|g| max_j
        ||w_j||, checked here against 65504 with a 4x margin; the attention output (o_proj) and
        SiLU(gate) * up (down_proj, whose inputs reach thousands on the default model) are checked
        at run time, and down_proj's input is scaled by 1/32 first."""
        done = 0
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            plan = []
            if hasattr(attn, "qkv_proj"):  # (q/k norms, where present, come after it)
                plan.append((attn, "qkv_proj", layer.input_layernorm))
            plan.append((attn, "o_proj", None))
            if hasattr(mlp, "gate_up_proj"):
                plan.append((mlp, "gate_up_proj", layer.post_attention_layernorm))
            plan.append((mlp, "down_proj", None))
            for owner, name, norm in plan:
                lin = getattr(owner, name)
                if not isinstance(lin, nn.Linear) or lin.weight.device.type != "cpu":
                    continue
                scale = 1.0 / 32 if name == "down_proj" else 1.0
                w16 = HalfGemvLinear.exact(lin.weight)
                if w16 is None:
                    continue
                guard = True
                if norm is not None:
                    rows = torch.linalg.vector_norm(w16, dim=1, dtype=torch.float32)
                    bound = math.sqrt(w16.shape[1]) * float(norm.weight.detach().float().abs().max()) * \
                        float(rows.max())
                    bias = 0.0 if lin.bias is None else float(lin.bias.detach().float().abs().max())
                    guard = bound + bias > _FP16_MAX / 4
                setattr(owner, name, HalfGemvLinear(lin, scale, guard, weight16=w16))
                done += 1
        return done

    def fuse(self) -> "LlamaForCausalLM":
        """Merge each layer's q/k/v and gate/up projections (after the weights are loaded: the
        state-dict names are Hugging Face's, the fused model's are not)."""
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()
        return self

    @staticmethod
    def sanitize(tensors: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
        """Drop what the model does not hold (rotary buffers); a tied head shares the embedding."""
        out = {k: v for k, v in tensors.items() if "rotary_emb" not in k}
        if args.tie_word_embeddings:
            out["lm_head.weight"] = out["model.embed_tokens.weight"]
        return out
