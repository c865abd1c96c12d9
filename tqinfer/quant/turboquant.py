"""TurboQuant (Zandieh et al. 2025): rotate, quantize every coordinate with one Lloyd-Max codebook.

TurboQuantMSE minimizes ||x - x̂||²; TurboQuantProd adds a 1-bit QJL sketch of the residual so that
<q, x̂> is an unbiased estimate of <q, x>; TurboQuantSplit reaches fractional bit widths by giving an
outlier channel set more bits than the rest. All three are KVCodecs: `quantize` / `dequantize` work
on vectors [..., d], `encode` / `decode` on the cache's byte records [..., H, record_bytes].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import KVCodec
from .codebook import codebook
from .packing import pack, packed_bytes, swap3, unpack
from .qjl import QJLSketch, SketchedCodec
from .records import (assemble, check_input, check_norms, check_record, contiguous_bytes, even, fp16_bytes, pad_to,
                      read_fp16)
from .rotation import Rotation, derive_seed


@dataclass
class QuantizedVectors:
    """A batch [...] of quantized vectors, as stored (packed codes, fp16 norms)."""

    codes: torch.Tensor  # uint8 [..., code bytes], planes per packing.py
    norms: torch.Tensor  # fp16 [...]; TurboQuantSplit: [..., 2] (outlier part, rest)
    signs: torch.Tensor | None = None  # TurboQuantProd: QJL sign plane uint8 [..., m / 8]
    gamma: torch.Tensor | None = None  # TurboQuantProd: residual norm ||x - x̂_mse|| fp16 [...]


def _unit(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validated float x, its norms, and x / ||x|| (zero vectors stay zero)."""
    x = check_input(x, dim)
    n = torch.linalg.vector_norm(x, dim=-1)
    check_norms(x, n)
    return x, n, x / n.clamp_min(1e-30).unsqueeze(-1)


def _float(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()


# query-aware rounding: ridge added to H = Π diag(query energy) Πᵀ, as a share of its mean diagonal
# (0.01 measured better than 0.1 for tq4 over rotation seeds, docs/QUALITY.md)
QUERY_RIDGE = 0.01

_TABLES: dict[tuple, dict[str, torch.Tensor]] = {}  # TurboQuantMSE._tables, by (bits, dim, device)


class RotatedCodec(KVCodec):
    """A codec whose rotated space is one Rotation `rot` of the whole vector."""

    rot: Rotation

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        return self.rot.apply(check_input(x, self.dim))

    def unrotate(self, y: torch.Tensor) -> torch.Tensor:
        return self.rot.inverse(_float(y))


class TurboQuantMSE(RotatedCodec):
    """b-bit TurboQuant-mse: x̂ = ||x|| Πᵀ c[idx], c the Lloyd-Max codebook of the sphere density in R^d.

    Record [code planes: packed_bytes(d, b) bytes, zero-padded to even][norm ||x|| fp16]
    (d = 128: b = 1..4 -> 18, 34, 50, 66 bytes). Rotated space: Π x.

    Query-aware rounding (keys; set by calibrate_queries, saved as state "query_energy"): a key's
    error reaches attention as q . e, so the codes are chosen to make e^T E[q q^T] e small rather
    than ||e||^2: coordinate by coordinate in the rotated space, each coordinate's rounding error fed
    forward to the ones not yet rounded (GPTQ/OBQ error feedback under H = Π diag(energy) Πᵀ, energy
    the queries' mean square per channel, averaged within RoPE pairs). The codebook, rotation, norm and
    record are the plain ones, so every decoder (the torch twin, the kernels) reads the records as it
    is; only the choice among the 2^b centroids changes (docs/QUALITY.md, "... and query-aware rounding").
    """

    query_energy: torch.Tensor | None = None  # float64 [heads, d] while query-aware rounding is on

    def __init__(self, dim: int, bits: int, *, seed: int = 0, rotation: str = "hadamard",
                 heads: int = 1, name: str | None = None):
        self.name, self.dim, self.bits, self.heads = name or f"tq{bits}", dim, bits, heads
        self.rot = Rotation(dim, derive_seed(seed, 0), rotation)
        self.centroids64, self.boundaries64 = codebook(bits, dim)
        self.code_bytes = packed_bytes(dim, bits)
        self.norm_at = even(self.code_bytes)
        self.record_bytes = self.norm_at + 2
        self._books: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _book(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (like.device, like.dtype)
        if key not in self._books:
            self._books[key] = (self.centroids64.to(like.device, like.dtype),
                                self.boundaries64.to(like.device, like.dtype))
        return self._books[key]

    # the pieces prod and split reuse
    def codes_of(self, y_unit: torch.Tensor) -> torch.Tensor:
        """Rotated unit coordinates [..., d] -> code indices uint8 [..., d] (nearest centroid)."""
        return torch.bucketize(y_unit, self._book(y_unit)[1]).to(torch.uint8)

    def centroids_of(self, idx: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
        c = self._book(like if like is not None else torch.empty(0, device=idx.device))[0]
        return c[idx.long()]

    def values(self, codes: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        """Packed codes [..., code_bytes] and norms [...] -> rotated x̂ [..., d] float32."""
        return self.unit_values(codes) * norms.float().unsqueeze(-1)

    def unit_values(self, codes: torch.Tensor, scratch=None) -> torch.Tensor:
        """Packed codes [..., code_bytes] -> the centroids c[idx] [..., d] float32 (norms not applied).
        scratch(name, shape, dtype) -> tensor, where given, supplies reused buffers for the index and
        the result (the attention twin's per-step intermediates; the result is valid until the next call)."""
        if self.bits in (1, 2, 3, 4) and self.dim % 8 == 0:
            return self._table_lookup(codes, scratch)
        return self.centroids_of(unpack(codes, self.bits, self.dim))

    def _tables(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Lookup tables index -> the centroids of the codes the index holds, one lookup per byte,
        not per code: the attention twin decodes every cached token each step, so this is its hot
        loop. Each entry's 2 or 4 float32 centroids are stored as one float64 /
        complex128 element, because index_select of one element per index on a 1-D table is ~3x
        faster on CPU than F.embedding of a row.
        - "byte" (1, 2, 4 bits): a code byte -> its 8 / b centroids.
        - "lo_hi" (3 bits, planes [2, 1]): lo-plane byte j | (the high bits of its 4 codes) << 8 ->
          4 centroids; "nibbles": a hi-plane byte -> the high bits of its codes 0-3 and 4-7, each four
          in plain order << 8 (int32 pair as int64; the plane's bits are in packing.PERM3's order)."""
        key = (self.bits, self.dim, device)  # shared by every codec of these bits and dim: one copy in cache
        if key not in _TABLES:
            c = self.centroids64.float()

            def fields(i, width, n):  # [len(i), n] fields of `width` bits of each index
                return (i[:, None] >> (torch.arange(n)[None, :] * width)) & ((1 << width) - 1)

            def as_elements(v):  # [n, k] float32 -> [n] of a k * 4-byte dtype (k = 1, 2, 4) or [n, k]
                kind = {2: torch.float64, 4: torch.complex128}.get(v.shape[1])
                return v.contiguous().view(kind).view(-1) if kind else v.contiguous()

            b = torch.arange(256)
            if self.bits == 3:
                i = torch.arange(4096)
                codes = fields(i, 2, 4) | ((i[:, None] >> 8 >> torch.arange(4)[None, :]) & 1) << 2
                plain = swap3(b)
                books = {"lo_hi": as_elements(c[codes]),
                         "nibbles": (torch.stack([plain & 15, plain >> 4], -1) << 8).int().view(torch.int64).view(-1)}
            else:
                # (a 16-bit word -> 4 centroids table for 4 bits was measured slower in the model:
                # at 1 MB it falls out of cache between layers)
                books = {"byte": as_elements(c[fields(b, self.bits, 8 // self.bits)])}
            _TABLES[key] = {k: t.to(device) for k, t in books.items()}
        return _TABLES[key]

    def _table_lookup(self, codes: torch.Tensor, scratch=None) -> torch.Tensor:
        t = self._tables(codes.device)
        lead, d = codes.shape[:-1], self.dim

        def as_int(x, name):  # uint8 -> int32 index, contiguous
            x = contiguous_bytes(x)
            if scratch is None:
                return x.int()
            return scratch(name, x.shape, torch.int32).copy_(x)

        def select(table, idx, name):  # 1-D table at flat idx -> [idx.numel()] of the table's dtype
            if scratch is None:
                return table.index_select(0, idx.reshape(-1))
            return torch.index_select(table, 0, idx.reshape(-1), out=scratch(name, (idx.numel(),), table.dtype))

        def lookup(table, idx):  # idx int [..., k] -> float32 [*lead, d]
            if table.dim() == 2:  # 8 centroids per entry (1 bit): rows
                return torch.nn.functional.embedding(idx, table).reshape(*lead, d)
            return select(table, idx, "values").view(torch.float32).view(*lead, d)

        if self.bits == 3:
            q = d // 4
            hi = select(t["nibbles"], as_int(codes[..., q:q + d // 8], "hi"), "nibbles")
            hi = hi.view(torch.int32).view(*lead, q)
            # lo-plane bytes made int32 first: an int32 += uint8 would copy them through a promotion
            return lookup(t["lo_hi"], as_int(codes[..., :q], "lo").add_(hi))
        return lookup(t["byte"], as_int(codes, "index"))

    def quantize(self, x: torch.Tensor) -> QuantizedVectors:
        _, n, u = _unit(x, self.dim)
        y = self.rot.apply(u)
        codes = self.codes_of(y) if self.query_energy is None else self._query_aware_codes(y)
        return QuantizedVectors(pack(codes, self.bits), n.half())

    # query-aware rounding
    def calibrate_queries(self, q: torch.Tensor) -> None:
        """Turn on query-aware rounding for the queries q [T, Hq, d] (post-RoPE, Hq a multiple of the
        codec's heads; the query heads of a KV head's group are pooled): energy = E[q²] per channel,
        each RoPE pair (i, i + d/2) given its mean (a pair's energy does not change with the position,
        its cross terms do)."""
        q = check_input(q, self.dim)
        if q.dim() != 3 or q.shape[1] % self.heads:
            raise ValueError(f"{self.name}: queries must be [T, Hq, {self.dim}] with Hq a multiple of "
                             f"{self.heads} heads, got {tuple(q.shape)}")
        T, hq, d = q.shape
        e = q.double().reshape(T, self.heads, hq // self.heads, d).pow(2).mean((0, 2)).cpu()
        if d % 2 == 0:
            pair = (e[:, : d // 2] + e[:, d // 2 :]) / 2
            e = torch.cat([pair, pair], -1)
        self.set_query_energy(e)

    def set_query_energy(self, energy: torch.Tensor | None) -> None:
        """Query energy per (head, channel) [heads, d] for query-aware rounding; None: nearest centroid."""
        if energy is not None:
            # float32 values (the saved state's dtype), so a loaded cache encodes as the saved one
            energy = energy.detach().to("cpu", torch.float32).double()
            if energy.shape != (self.heads, self.dim) or not bool(torch.isfinite(energy).all()) \
                    or bool((energy < 0).any()):
                raise ValueError(f"{self.name}: query energy must be finite, >= 0, [{self.heads}, {self.dim}]")
            if not bool((energy.sum(-1) > 0).all()):
                energy = None  # a head without query energy gives no weighting: keep the plain codes
        self.query_energy = energy
        self._feedback: dict[tuple, list] = {}

    def _feedback_rows(self, like: torch.Tensor) -> torch.Tensor:
        """U [heads, d, d] (upper triangular, like's device and dtype): Cholesky factor of H⁻¹, H the
        query energy rotated into the codec's space plus a ridge of QUERY_RIDGE times its mean."""
        e = self.query_energy
        h = torch.diag_embed(e + QUERY_RIDGE * e.mean(-1, keepdim=True))
        p = self.rot.matrix64
        return torch.linalg.cholesky(torch.linalg.inv(p @ h @ p.T), upper=True).to(like.device, like.dtype)

    def _query_aware_codes(self, y: torch.Tensor) -> torch.Tensor:
        """Rotated unit coordinates [..., heads, d] (or [..., d] with one head) -> code indices uint8,
        rounded in coordinate order with each error fed forward through U's row."""
        if self.heads > 1 and (y.dim() < 2 or y.shape[-2] != self.heads):
            raise ValueError(f"codec for {self.heads} heads got input of shape {tuple(y.shape)}")
        one = self.heads == 1 and (y.dim() < 2 or y.shape[-2] != 1)
        key = (y.device, y.dtype, one)
        if key not in self._feedback:  # U's diagonal and the rest of each row as views, made once:
            u = self._feedback_rows(y)  # the loop below is op-bound on the CPU
            u = u[0] if one else u
            self._feedback[key] = [(u[..., j, j], u[..., j, j + 1 :]) for j in range(self.dim)]
        rows = self._feedback[key]
        c, b = self._book(y)
        y = y.clone()
        cols = []
        for j in range(self.dim):
            yj = y[..., j].contiguous()
            ij = torch.bucketize(yj, b)
            cols.append(ij)
            if j + 1 < self.dim:
                diag, rest = rows[j]
                y[..., j + 1 :] -= ((yj - c[ij]) / diag).unsqueeze(-1) * rest
        return torch.stack(cols, -1).to(torch.uint8)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.query_energy is None else {"query_energy": self.query_energy.float()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) - {"query_energy"}:
            raise ValueError(f"{self.name}: unknown state {sorted(set(state) - {'query_energy'})}")
        self.set_query_energy(state.get("query_energy"))

    def dequantize(self, q: QuantizedVectors) -> torch.Tensor:
        return self.rot.inverse(self.values(q.codes, q.norms))

    def inner_product(self, queries: torch.Tensor, q: QuantizedVectors) -> torch.Tensor:
        """<queries, x̂> over the last dim, queries [..., d] broadcast against the batch."""
        return (_float(queries) * self.dequantize(q)).sum(-1)

    # KVCodec
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        q = self.quantize(x)
        return assemble([pad_to(q.codes, self.norm_at), fp16_bytes(q.norms.unsqueeze(-1))],
                        self.record_bytes)

    def decode_rotated(self, rec: torch.Tensor) -> torch.Tensor:
        check_record(rec, self.record_bytes, self.name)
        return self.values(rec[..., : self.code_bytes], read_fp16(rec, self.norm_at, 1).squeeze(-1))

    def rotated_parts(self, rec: torch.Tensor, scratch=None):
        check_record(rec, self.record_bytes, self.name)
        return [(0, self.dim, self.unit_values(rec[..., : self.code_bytes], scratch),
                 read_fp16(rec, self.norm_at, 1).squeeze(-1))]


class TurboQuantProd(RotatedCodec, SketchedCodec):
    """b-bit TurboQuant-prod: (b-1)-bit TurboQuant-mse codes plus QJL signs of the rotated residual
    r = Πx/||x|| - c[idx] (m = d signs), so <q, x> ≈ <q, x̂_mse> + γ √(π/2)/m <S Π q, sign(S r)>,
    γ = ||x||·||r||: unbiased over the draw of S. b = 1 is QJL alone (after the rotation).
    sketch="gaussian" is the paper's S; "orthogonal" (default) has orthogonal rows, which removes the
    variance along r: d·D_prod ≈ (π/2 - 1)·D_mse(b-1) instead of (π/2)·D_mse(b-1), same cost.

    Record [(b-1)-bit code planes][1-bit sign plane, m/8 bytes][zero pad to even][norm fp16][γ fp16]
    (d = 128: b = 2..4 -> 36, 52, 68 bytes). Rotated space: Π x; the sketch acts there.
    """

    has_qjl = True

    def __init__(self, dim: int, bits: int, *, seed: int = 0, rotation: str = "hadamard",
                 sketch: str = "orthogonal", heads: int = 1, name: str | None = None):
        if bits < 1:
            raise ValueError(f"TurboQuantProd needs bits >= 1, got {bits}")
        self.name, self.dim, self.bits, self.heads = name or f"tqp{bits}", dim, bits, heads
        self.mse = TurboQuantMSE(dim, bits - 1, seed=seed, rotation=rotation) if bits > 1 else None
        self.rot = self.mse.rot if self.mse else Rotation(dim, derive_seed(seed, 0), rotation)
        self.sketch = QJLSketch(dim, dim, derive_seed(seed, 3), sketch)
        self.qjl_dim = dim
        self.code_bytes = self.mse.code_bytes if self.mse else 0
        self.sign_bytes = packed_bytes(dim, 1)
        self.norm_at = even(self.code_bytes + self.sign_bytes)
        self.record_bytes = self.norm_at + 4

    def quantize(self, x: torch.Tensor) -> QuantizedVectors:
        _, n, u = _unit(x, self.dim)
        y = self.rot.apply(u)
        if self.mse:
            idx = self.mse.codes_of(y)
            codes, r = pack(idx, self.mse.bits), y - self.mse.centroids_of(idx, y)
        else:
            codes, r = torch.empty(*y.shape[:-1], 0, dtype=torch.uint8, device=y.device), y
        gamma = n * torch.linalg.vector_norm(r, dim=-1)
        return QuantizedVectors(codes, n.half(), self.sketch.sign_bits(r), gamma.half())

    def _mse_values(self, codes: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        if self.mse:
            return self.mse.values(codes, norms)
        return torch.zeros(*norms.shape, self.dim, device=norms.device)

    def dequantize(self, q: QuantizedVectors) -> torch.Tensor:
        """The full estimate Πᵀ(x̂_mse + γ √(π/2)/m Sᵀ signs): unbiased, not minimum-MSE."""
        y = self._mse_values(q.codes, q.norms)
        qjl = self.sketch.unproject(self.sketch.signs(q.signs)) * self.sketch.scale
        return self.rot.inverse(y + q.gamma.float().unsqueeze(-1) * qjl)

    def inner_product(self, queries: torch.Tensor, q: QuantizedVectors) -> torch.Tensor:
        """Unbiased estimate of <queries, x> over the last dim, queries broadcast against the batch."""
        return (_float(queries) * self.dequantize(q)).sum(-1)

    # KVCodec
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        q = self.quantize(x)
        head = pad_to(torch.cat([q.codes, q.signs], -1), self.norm_at)
        return assemble([head, fp16_bytes(torch.stack([q.norms, q.gamma], -1))], self.record_bytes)

    def decode_rotated(self, rec: torch.Tensor) -> torch.Tensor:
        check_record(rec, self.record_bytes, self.name)
        return self._mse_values(rec[..., : self.code_bytes], read_fp16(rec, self.norm_at, 1).squeeze(-1))

    def qjl_signs(self, rec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_record(rec, self.record_bytes, self.name)
        signs = self.sketch.signs(rec[..., self.code_bytes : self.code_bytes + self.sign_bytes])
        return signs, read_fp16(rec, self.norm_at + 2, 1).squeeze(-1) * self.sketch.scale


def _permute(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """x[..., H, d] gathered per head by perm [H, d]; x[..., d] by perm [1, d]."""
    if perm.shape[0] == 1:
        return x[..., perm[0]]
    if x.dim() < 2 or x.shape[-2] != perm.shape[0]:
        raise ValueError(f"codec for {perm.shape[0]} heads got input of shape {tuple(x.shape)}")
    return torch.gather(x, -1, perm.expand(x.shape))


class TurboQuantSplit(KVCodec):
    """Fractional bits: per head, `outliers` channels at `bits_outlier` and the other d - outliers at
    `bits_rest`, two independent TurboQuant-mse quantizers (own rotation, own norm). Code bits per
    coordinate: (outliers·bits_outlier + (d - outliers)·bits_rest) / d (norms counted separately, in
    bits_per_value). The outlier set is chosen per head from calibration data (largest mean square);
    with rope_pairs, in pairs (i, i + d/2), the pairs the half-split rotate_half RoPE rotates together,
    so the set does not depend on position. Uncalibrated, the outliers are the first channels
    (first pairs).

    Rotated space, per head: concat(R_A x[perm_A], R_B x[perm_B]) with perm = state_dict()["perm"].
    Record [part A planes][part B planes][zero pad to even][norm A fp16][norm B fp16]
    (d = 128, 64@3 + 64@2: 24 + 16 + 4 = 44 bytes).
    """

    needs_calibration = True

    def __init__(self, dim: int, outliers: int, bits_outlier: int, bits_rest: int, *, heads: int = 1,
                 seed: int = 0, rotation: str = "hadamard", rope_pairs: bool = True,
                 calibration: torch.Tensor | None = None, name: str | None = None):
        if not 3 <= outliers <= dim - 3:
            raise ValueError(f"outlier count must be in 3..{dim - 3} for head_dim {dim}, got {outliers}")
        if rope_pairs and (dim % 2 or outliers % 2):
            raise ValueError(f"rope_pairs needs even head_dim and outlier count, got {dim}, {outliers}")
        self.name = name or f"tq{outliers}x{bits_outlier}+{dim - outliers}x{bits_rest}"
        self.dim, self.heads, self.outliers, self.rope_pairs = dim, heads, outliers, rope_pairs
        self.a = TurboQuantMSE(outliers, bits_outlier, seed=derive_seed(seed, 1), rotation=rotation)
        self.b = TurboQuantMSE(dim - outliers, bits_rest, seed=derive_seed(seed, 2), rotation=rotation)
        self.code_bits = (outliers * bits_outlier + (dim - outliers) * bits_rest) / dim
        self.norm_at = even(self.a.code_bytes + self.b.code_bytes)
        self.record_bytes = self.norm_at + 4
        k = outliers // 2 if rope_pairs else outliers
        first = torch.cat([torch.arange(k), torch.arange(k) + dim // 2]) if rope_pairs else torch.arange(k)
        self._set_outliers(first.expand(heads, -1))
        if calibration is not None:
            self.calibrate(calibration)

    def _set_outliers(self, outl: torch.Tensor) -> None:
        outl = outl.sort(-1).values
        rest = torch.ones(self.heads, self.dim, dtype=torch.bool).scatter(-1, outl, False)
        rest = torch.arange(self.dim).expand(self.heads, -1)[rest].reshape(self.heads, -1)
        self.perm = torch.cat([outl, rest], -1).contiguous()
        self.inv_perm = self.perm.argsort(-1)
        self._dev: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._mats: dict[tuple, torch.Tensor] = {}

    def _perms(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._dev:
            self._dev[device] = (self.perm.to(device), self.inv_perm.to(device))
        return self._dev[device]

    def calibrate(self, x: torch.Tensor) -> None:
        """Choose each head's outlier channels from x[N, H, d] (or [N, d] with one head)."""
        x = check_input(x, self.dim)
        if not bool(torch.isfinite(x).all()):
            raise ValueError("calibration data contains NaN or Inf")
        x = x.reshape(-1, self.heads, self.dim)
        energy = x.double().pow(2).mean(0).cpu()  # [H, d]
        if self.rope_pairs:
            half = self.dim // 2
            top = (energy[:, :half] + energy[:, half:]).topk(self.outliers // 2, -1).indices
            self._set_outliers(torch.cat([top, top + half], -1))
        else:
            self._set_outliers(energy.topk(self.outliers, -1).indices)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"perm": self.perm.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        perm = state["perm"].to("cpu", torch.int64)
        ok = perm.shape == (self.heads, self.dim) and bool(
            (perm.sort(-1).values == torch.arange(self.dim)).all())
        if not ok:
            raise ValueError(f"{self.name}: state 'perm' must be a per-head permutation [{self.heads}, {self.dim}]")
        self._set_outliers(perm[:, : self.outliers])

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xp = _permute(x, self._perms(x.device)[0])
        return xp[..., : self.outliers], xp[..., self.outliers :]

    def quantize(self, x: torch.Tensor) -> QuantizedVectors:
        xa, xb = self._split(check_input(x, self.dim))
        qa, qb = self.a.quantize(xa), self.b.quantize(xb)
        return QuantizedVectors(torch.cat([qa.codes, qb.codes], -1), torch.stack([qa.norms, qb.norms], -1))

    def _values(self, codes: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        na = self.a.code_bytes
        ya = self.a.values(codes[..., :na], norms[..., 0])
        yb = self.b.values(codes[..., na : na + self.b.code_bytes], norms[..., 1])
        return torch.cat([ya, yb], -1)

    def dequantize(self, q: QuantizedVectors) -> torch.Tensor:
        return self.unrotate(self._values(q.codes, q.norms))

    def inner_product(self, queries: torch.Tensor, q: QuantizedVectors) -> torch.Tensor:
        return (_float(queries) * self.dequantize(q)).sum(-1)

    # KVCodec
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        q = self.quantize(x)
        return assemble([pad_to(q.codes, self.norm_at), fp16_bytes(q.norms)], self.record_bytes)

    def _matrices(self, like: torch.Tensor) -> torch.Tensor:
        """Per head M [H, d, d] with rotate(x)[..., h, :] = M[h] @ x[..., h, :]: the channel permutation
        and the two block rotations in one matrix (its entries are the rotations' own), so a query or
        an attention output is rotated by one matmul instead of a gather, two matmuls and a concat."""
        key = (like.device, like.dtype)
        if key not in self._mats:
            blocks = torch.block_diag(self.a.rot.matrix64, self.b.rot.matrix64)
            perm = torch.zeros(self.heads, self.dim, self.dim, dtype=torch.float64)
            perm.scatter_(2, self.perm.unsqueeze(-1), 1.0)  # row i picks channel perm[h, i]
            self._mats[key] = (blocks @ perm).to(like.device, like.dtype)
        return self._mats[key]

    def _per_head(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        if self.heads == 1:
            return x @ m[0].T
        if x.dim() < 2 or x.shape[-2] != self.heads:
            raise ValueError(f"codec for {self.heads} heads got input of shape {tuple(x.shape)}")
        # one bmm over heads-first rows (a broadcast batch of [d, d] @ [d, 1] products was ~10x slower
        # on the CPU: 45-67 us against 5.7 us for a decode step's query)
        xh = x.reshape(-1, self.heads, self.dim).transpose(0, 1)
        return torch.bmm(xh, m.transpose(1, 2)).transpose(0, 1).reshape(x.shape)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        x = check_input(x, self.dim)
        return self._per_head(x, self._matrices(x))

    def unrotate(self, y: torch.Tensor) -> torch.Tensor:
        y = _float(y)
        return self._per_head(y, self._matrices(y).transpose(1, 2))

    def decode_rotated(self, rec: torch.Tensor) -> torch.Tensor:
        check_record(rec, self.record_bytes, self.name)
        return self._values(rec[..., : self.norm_at], read_fp16(rec, self.norm_at, 2))

    def rotated_parts(self, rec: torch.Tensor, scratch=None):
        check_record(rec, self.record_bytes, self.name)
        na, k = self.a.code_bytes, self.outliers
        norms = read_fp16(rec, self.norm_at, 2)
        sa = sb = None
        if scratch is not None:  # both parts are alive at once: their buffers must differ
            def sa(name, shape, dtype): return scratch(("a", name), shape, dtype)
            def sb(name, shape, dtype): return scratch(("b", name), shape, dtype)
        return [(0, k, self.a.unit_values(rec[..., :na], sa), norms[..., 0]),
                (k, self.dim, self.b.unit_values(rec[..., na:na + self.b.code_bytes], sb), norms[..., 1])]


@dataclass(frozen=True)
class RecordPart:
    """One TurboQuant-mse quantizer inside a record, as kernels read it: its codes are rotated channels
    [channel, channel + quantizer.dim), their planes start at byte `planes`, its fp16 norm sits at byte
    `scale`."""

    channel: int
    quantizer: TurboQuantMSE
    planes: int
    scale: int


def mse_parts(codec) -> list[RecordPart]:
    """The MSE parts of a TurboQuant codec's records in record order (a prod codec: its (b-1)-bit
    part; the QJL signs are not an MSE part). NotImplementedError for any other codec."""
    if type(codec) is TurboQuantMSE:
        return [RecordPart(0, codec, 0, codec.norm_at)]
    if type(codec) is TurboQuantSplit:
        return [RecordPart(0, codec.a, 0, codec.norm_at),
                RecordPart(codec.outliers, codec.b, codec.a.code_bytes, codec.norm_at + 2)]
    if type(codec) is TurboQuantProd and codec.mse is not None:
        return [RecordPart(0, codec.mse, 0, codec.norm_at)]
    raise NotImplementedError(f"no kernel reads {getattr(codec, 'name', codec)!r} records")


def rotation_matrices(codec) -> torch.Tensor:
    """[H, d, d] float32 with codec.rotate(x)[..., h, :] = M[h] @ x[..., h, :] (a split codec's channel
    permutation and both rotations in one matrix), for kernels that rotate by a matrix product. Kept
    on the codec until its state (a split codec's calibrated channels: `perm`) changes."""
    state = getattr(codec, "perm", None)
    cached = codec.__dict__.get("_rotation_matrices")
    if cached is None or cached[0] is not state:
        d = codec.dim
        eye = torch.eye(d, dtype=torch.float64).unsqueeze(1).expand(d, codec.heads, d).contiguous()
        cached = (state, codec.rotate(eye).float().permute(1, 2, 0).contiguous())  # [H, d_out, d_in]
        codec.__dict__["_rotation_matrices"] = cached
    return cached[1]
