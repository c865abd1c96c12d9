"""The C kernel for attention over TurboQuant records on the CPU (tqinfer/kernels/cpu.py) against float64
math over the same records, decoded independently (tqinfer.quant.packing.unpack, float64 centroids,
the fp16 norms): scores, weighted values and rotated tiles, for every record layout it reads, head
dims 64 / 128 / 256, query groups 1 / 3 / 4 / 8, token ranges from one token to several blocks and
threads' chunks, outputs poisoned with NaN first. Then the decode and prefill paths through it against
the torch twin's own path (TQINFER_KERNELS=torch), and the fallback where no compiler works."""

import math

import pytest
import torch

from tqinfer.kernels import cpu, reference
from tqinfer.quant.packing import unpack
from tqinfer.quant.records import read_fp16
from tqinfer.quant.registry import make_codec
from tqinfer.quant.turboquant import mse_parts

from .cachegen import attention64, build_cache, rel_err

BS = 16
TYPES = ["tq3.5", "tq4", "tq3", "tq2", "tq2.5", "tq1", "tq3.5-paper"]
# (first token, count): one token, inside a block, block size - 1 and + 1 across block edges, and
# enough tokens that two threads split each head
RANGES = [(0, 1), (5, 17), (3, BS - 1), (BS, BS + 1), (7, 700)]
TOL = 2e-6  # float32 sums of at most d products of |values| <= ~4 against float64


def paged_records(codec, n_tokens, heads, gen):
    """Pool [blocks, H, BS, R] of records of random vectors (norms 0.5-4), under a shuffled block table."""
    blocks = -(-n_tokens // BS)
    x = torch.randn(blocks * BS, heads, codec.dim, generator=gen)
    x = x * (0.5 + 3.5 * torch.rand(blocks * BS, heads, 1, generator=gen)) / x.norm(dim=-1, keepdim=True)
    rec = codec.encode(x).view(blocks, BS, heads, -1)
    order = torch.randperm(blocks + 2, generator=gen)[:blocks]
    pool = torch.zeros(blocks + 2, heads, BS, rec.shape[-1], dtype=torch.uint8)
    pool[order] = rec.transpose(1, 2)
    return pool, order.to(torch.int32), rec.reshape(blocks * BS, heads, -1)


def rotated64(codec, rec):
    """Records [..., R] -> rotated values [..., d] float64 (the oracle's decode, not the kernel's)."""
    out = torch.empty(*rec.shape[:-1], codec.dim, dtype=torch.float64)
    for p in mse_parts(codec):
        q = p.quantizer
        idx = unpack(rec[..., p.planes:p.planes + q.code_bytes].contiguous(), q.bits, q.dim).long()
        out[..., p.channel:p.channel + q.dim] = q.centroids64[idx] * read_fp16(rec, p.scale, 1).double()
    return out


def kernel_for(kind, d, heads, group):
    codec = make_codec(kind, d, heads, seed=3)
    k = cpu.cpu_attention(codec, group, torch.device("cpu"))
    if k is None:
        pytest.skip("no C compiler builds the CPU kernel here")
    return codec, k


@pytest.mark.parametrize("kind,d,group", [(t, 64, 3) for t in TYPES] + [("tq3.5", 128, 1), ("tq3.5", 128, 4),
                                                                       ("tq4", 256, 8), ("tq2.5", 128, 8)])
def test_kernel_matches_float64(kind, d, group):
    heads = 2
    gen = torch.Generator().manual_seed(sum(map(ord, kind)) + d + group)
    codec, kern = kernel_for(kind, d, heads, group)
    n_tokens = max(t0 + n for t0, n in RANGES)
    pool, table, rec = paged_records(codec, n_tokens, heads, gen)
    vals = rotated64(codec, rec).transpose(0, 1)  # [H, tokens, d]
    for t0, n in RANGES:
        v = vals[:, t0:t0 + n]
        q = torch.randn(heads, group, d, generator=gen)
        ld = n + 5  # rows of a wider buffer, as the decode step's concatenated scores
        out = torch.full((heads, group, ld), float("nan"))[..., :n]
        kern.scores(pool, table, t0, n, q, out)
        want = q.double() @ v.transpose(1, 2)
        assert torch.isfinite(out).all()
        assert (out.double() - want).abs().max() <= TOL * want.abs().max() * math.sqrt(d), (kind, t0, n)

        p = torch.rand(heads, group, ld, generator=gen)[..., :n]
        o = kern.values(pool, table, t0, n, p, torch.full((heads, group, d), float("nan")))
        want = p.double() @ v
        assert torch.isfinite(o).all()
        assert (o.double() - want).abs().max() <= TOL * want.abs().max() * math.sqrt(n), (kind, t0, n)

        tile = kern.values_rotated(pool, table, t0, n, torch.full((heads, n, d), float("nan")))
        assert torch.isfinite(tile).all()
        assert (tile.double() - v).abs().max() <= 1e-6 * v.abs().max(), (kind, t0, n)


def test_layouts_it_reads():
    """TurboQuant-mse and split records with parts of 16k channels; never QJL, baselines or others."""
    reads = {k: cpu._layout(make_codec(k, 64, 2, seed=0)) is not None
             for k in TYPES + ["tqp3", "q8", "q4", "polar", "tq3.5-paper"]}
    assert reads == {**{k: True for k in TYPES}, "tqp3": False, "q8": False, "q4": False, "polar": False}
    assert cpu._layout(make_codec("tq3", 72, 2, seed=0)) is None  # 72 channels: not whole vectors of 16


@pytest.mark.parametrize("kt,vt,dtype", [("tq3.5", "tq3.5", torch.float32), ("tq3.5", "tq3.5", torch.bfloat16),
                                         ("tq4", "tq2.5", torch.float32), ("tqp3", "tq3.5", torch.float32),
                                         ("tq3.5", "bf16", torch.float32), ("bf16", "bf16", torch.float32)])
def test_decode_and_prefill_paths_match_twin(kt, vt, dtype, monkeypatch):
    """paged_attention on the CPU's fast paths (decode steps through the C kernel where a side's records
    allow it; prefill chunks as one SDPA over the decoded prefix, _prefill_sdpa, where both sides' do,
    and over a dense layer's pool) against the twin's own path and float64: a decode step per sequence
    and a prefill chunk, lengths across sinks, window, blocks; hot rows in float32 and bf16."""
    monkeypatch.setattr(reference, "TILE_TOKENS", 100)  # records in several tiles, the last one partial
    S, W, h, g, d = 4, 8, 2, 3, 64  # (h != g: a mix-up of KV heads and group members shows)
    lens = [3, S + W + 1, 5 * BS - 1, 700]
    view, kd, vd = build_cache(kt, vt, lens, heads=h, d=d, sinks=S, window=W, block_size=BS,
                               dtype=dtype, device="cpu", seed=11)
    gen = torch.Generator().manual_seed(12)
    scale = 1 / math.sqrt(d)
    for chunk in (1, 5):
        b = len(lens)
        q = torch.randn(b * chunk, h * g, d, generator=gen)
        k = torch.randn(b * chunk, h, d, generator=gen)
        v = torch.randn(b * chunk, h, d, generator=gen)
        cu = torch.arange(b + 1, dtype=torch.int32) * chunk
        args = (q, k, v, cu, torch.tensor(lens, dtype=torch.int32), view, scale)
        kw = dict(prefix_list=lens, chunk_list=[chunk] * b)
        monkeypatch.delenv("TQINFER_KERNELS", raising=False)
        fast = reference.paged_attention(*args, **kw)
        monkeypatch.setenv("TQINFER_KERNELS", "torch")
        twin = reference.paged_attention(*args, **kw)
        want = attention64(q, k, v, cu, lens, kd, vd, scale)
        assert torch.isfinite(fast).all()
        assert rel_err(fast, twin) < 1e-5, chunk
        # (bf16 hot rows: both paths store the chunk's own float32 k / v rounded to bf16, the oracle not)
        assert rel_err(fast, want) < (1e-5 if dtype == torch.float32 else 2e-3), chunk


def test_no_compiler_keeps_the_twin(tmp_path, monkeypatch):
    """A compiler that fails: one warning, no kernel (the callers then take the twin), remembered."""
    monkeypatch.setenv("TQINFER_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setattr(cpu, "_kernels", {})
    codec = make_codec("tq3", 32, 2, seed=5)  # a layout no other test compiles
    with pytest.warns(UserWarning, match="did not compile"):
        assert cpu.cpu_attention(codec, 2, torch.device("cpu")) is None
    assert not list((tmp_path / "cpu-kernels").glob("*.so"))
    assert cpu.cpu_attention(codec, 2, torch.device("cpu")) is None  # remembered: no second warning


def test_an_unwritable_cache_or_a_damaged_library_is_no_crash(tmp_path, monkeypatch):
    """A cache directory that cannot be created: a warning and the twin. A damaged library file in the
    cache: built again."""
    monkeypatch.setattr(cpu, "_kernels", {})
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    monkeypatch.setenv("TQINFER_CACHE", str(blocked))
    with pytest.warns(UserWarning, match="not available"):
        assert cpu.cpu_attention(make_codec("tq2", 48, 2, seed=5), 2, torch.device("cpu")) is None
    monkeypatch.setenv("TQINFER_CACHE", str(tmp_path / "cache"))
    codec = make_codec("tq2", 32, 2, seed=6)
    if cpu._compiler() is None:
        pytest.skip("no C compiler here")
    lib = cpu.library_path(cpu._layout(codec), 32, 2, cpu._compiler())
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"damaged")
    if cpu.cpu_attention(codec, 2, torch.device("cpu")) is None:
        pytest.skip("no C compiler builds the CPU kernel here")
    assert lib.stat().st_size > 1000


def test_nan_propagates():
    """A NaN query coordinate gives NaN scores for its row only; a NaN probability, NaN values for its row."""
    codec, kern = kernel_for("tq3.5", 64, 2, 3)
    pool, table, _ = paged_records(codec, 700, 2, torch.Generator().manual_seed(9))
    q = torch.randn(2, 3, 64)
    q[1, 2, 5] = float("nan")
    s = kern.scores(pool, table, 0, 700, q, torch.empty(2, 3, 700))
    assert s[1, 2].isnan().all() and not s[1, :2].isnan().any() and not s[0].isnan().any()
    p = torch.rand(2, 3, 700)
    p[0, 1, 650] = float("nan")  # in the second thread's chunk
    o = kern.values(pool, table, 0, 700, p, torch.empty(2, 3, 64))
    assert o[0, 1].isnan().all() and not o[0, 0].isnan().any() and not o[1].isnan().any()


def test_a_one_head_codec_over_several_heads_is_served(monkeypatch):
    """A codec built for one head over a pool of two (its rotation broadcast, as the twin does): the
    decode and prefill paths answer as the twin, not with an error."""
    import dataclasses

    S, W, h, g, d, lens = 4, 8, 2, 3, 64, [40, 300]
    view, _, _ = build_cache("tq4", "tq4", lens, heads=h, d=d, sinks=S, window=W, block_size=BS,
                             dtype=torch.float32, device="cpu", seed=11)
    view = dataclasses.replace(view, k_codec=make_codec("tq4", d, 1, seed=11 * 2 + 11),
                               v_codec=make_codec("tq4", d, 1, seed=11 * 2 + 12))
    gen = torch.Generator().manual_seed(3)
    for chunk in (1, 5):
        q = torch.randn(2 * chunk, h * g, d, generator=gen)
        k, v = torch.randn(2 * chunk, h, d, generator=gen), torch.randn(2 * chunk, h, d, generator=gen)
        args = (q, k, v, torch.tensor([0, chunk, 2 * chunk], dtype=torch.int32), torch.tensor(lens, dtype=torch.int32),
                view, 0.125)
        kw = dict(prefix_list=lens, chunk_list=[chunk, chunk])
        monkeypatch.delenv("TQINFER_KERNELS", raising=False)
        fast = reference.paged_attention(*args, **kw)
        monkeypatch.setenv("TQINFER_KERNELS", "torch")
        assert rel_err(fast, reference.paged_attention(*args, **kw)) < 1e-5, chunk
