"""Every registry type against the KVCodec contract: sizes, the rotated-space identity, edge inputs."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tqinfer.quant import codec_names, make_codec, reference_scores
from tqinfer.quant.codebook import codebook_mse

NAMES = codec_names()

# record bytes per (token, head), from the layouts in each class docstring
RECORD_BYTES = {
    128: {"bf16": 256, "q8": 130, "q4": 80, "tq1": 18, "tq2": 34, "tq3": 50, "tq4": 66, "tq2.5": 44,
          "tq3.5": 60, "tq2.5-paper": 40, "tq3.5-paper": 56, "tqp2": 36, "tqp3": 52, "tqp4": 68,
          "qjl": 18, "polar": 62},
    64: {"bf16": 128, "q8": 66, "q4": 40, "tq1": 10, "tq2": 18, "tq3": 26, "tq4": 34, "tq2.5": 24,
         "tq3.5": 32, "tq2.5-paper": 22, "tq3.5-paper": 30, "tqp2": 20, "tqp3": 28, "tqp4": 36,
         "qjl": 10, "polar": 32},
}


def data(shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def build(name, d=128, heads=2, seed=1, calib=True):
    c = make_codec(name, d, heads, seed=seed)
    if calib and c.needs_calibration:
        c.calibrate(data((256, heads, d), seed=99))
    return c


def test_registry_names():
    required = {"bf16", "q8", "q4", "tq1", "tq2", "tq3", "tq4", "tq2.5", "tq3.5", "tqp2", "tqp3", "tqp4",
                "qjl", "polar"}
    assert required <= set(NAMES) and "tq2.5-paper" in NAMES
    with pytest.raises(ValueError, match="tq3.5") as e:
        make_codec("tq9", 128, 1, seed=0)
    assert "unknown" in str(e.value) and all(n in str(e.value) for n in NAMES)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("name", NAMES)
def test_record_size_and_bits(name, d):
    c = build(name, d)
    assert c.name == name and c.dim == d and c.heads == 2
    assert c.record_bytes == RECORD_BYTES[d][name] and c.record_bytes % 2 == 0
    assert c.bits_per_value == c.record_bytes * 8 / d
    rec = c.encode(data((3, 5, 2, d)))
    assert rec.dtype == torch.uint8 and rec.shape == (3, 5, 2, c.record_bytes)
    assert c.decode(rec).shape == (3, 5, 2, d) and c.decode(rec).dtype == torch.float32


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("name", NAMES)
def test_rotated_space_identity_float64(name, d):
    """<rotate(q), decode_rotated(rec)> == <q, decode(rec)>, and the QJL hooks agree with each other;
    in float64 so only a wrong rotate/unrotate pair (not rounding) can break it."""
    c = build(name, d)
    rec = c.encode(data((7, 2, d), seed=1))
    q = data((7, 2, d), seed=2, dtype=torch.float64)
    y = c.decode_rotated(rec).double()
    q_rot = c.rotate(q)
    assert q_rot.dtype == torch.float64
    lhs = (q_rot * y).sum(-1)
    rhs = (q * c.unrotate(y)).sum(-1)
    assert torch.allclose(lhs, rhs, rtol=1e-10, atol=1e-10)
    if c.has_qjl:
        signs, gamma = c.qjl_signs(rec)
        assert set(signs.unique().tolist()) <= {-1.0, 1.0} and c.qjl_dim == signs.shape[-1]
        assert torch.all(gamma >= 0)
        a = (c.qjl_project(q_rot) * signs.double()).sum(-1)
        b = (q_rot * c.qjl_unproject(signs.double())).sum(-1)
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-9)
    # the reference score formula is <q, reconstruct(rec)> (fp32 rounding only)
    s = reference_scores(c, q.float(), rec)
    assert torch.allclose(s, (q.float() * c.reconstruct(rec)).sum(-1), rtol=1e-4, atol=1e-3)


def expected_rel_mse(c, d):
    """The distortion each decodable type should show on isotropic data, or an upper bound."""
    n = c.name
    if n.startswith("tqp") or n == "qjl":
        return None
    if n in ("tq1", "tq2", "tq3", "tq4"):
        return codebook_mse(int(n[2]), d) * d
    if n.startswith("tq"):
        ka, kb = c.a.dim, c.b.dim
        return (ka * ka * codebook_mse(c.a.bits, ka) + kb * kb * codebook_mse(c.b.bits, kb)) / d
    return None


@pytest.mark.parametrize("name", NAMES)
def test_reconstruction_error(name):
    d = 128
    c = build(name, d)
    x = data((4000, 2, d), seed=3)
    rel = ((x - c.decode(c.encode(x))).pow(2).sum(-1).mean() / x.pow(2).sum(-1).mean()).item()
    expect = expected_rel_mse(c, d)
    if expect is not None:
        assert rel == pytest.approx(expect, rel=0.04)  # isotropic Gaussian data: norms factor out
    bounds = {"bf16": 2e-5, "q8": 1e-4, "q4": 1e-2, "polar": 0.04}
    if name in bounds:
        assert rel < bounds[name]
    if c.has_qjl:  # the MSE part alone: zero for qjl, the (b-1)-bit distortion for prod
        expect = 1.0 if name == "qjl" else codebook_mse(int(name[3]) - 1, d) * d
        assert rel == pytest.approx(expect, rel=0.04)


@pytest.mark.parametrize("name", NAMES)
def test_zero_vectors(name):
    c = build(name)
    x = data((6, 2, 128))
    x[2] = 0
    x[4, 1] = 0
    rec = c.encode(x)
    xh = c.reconstruct(rec)
    assert torch.equal(xh[2], torch.zeros_like(xh[2])) and torch.equal(xh[4, 1], torch.zeros(128))
    # other rows are unaffected by a zero row in the batch
    assert torch.equal(rec[0], c.encode(x[:1])[0])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_inf_rejected(name, bad):
    c = build(name)
    x = data((3, 2, 128))
    x[1, 0, 17] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        c.encode(x)


def rel_err(c, x):
    return ((x - c.reconstruct(c.encode(x))).norm() / x.norm()).item()


@pytest.mark.parametrize("name", NAMES)
def test_huge_inputs_error_or_exact(name):
    """Beyond fp16 range a codec raises a clear error; where its stored fields still fit, it decodes
    as accurately as at unit scale. Never inf or NaN in a record."""
    c = build(name)
    x = data((64, 2, 128), seed=4)
    base = rel_err(c, x)
    raised = 0
    for scale in (1e4, 1e6):
        try:
            rec = c.encode(x * scale)
        except ValueError as e:
            assert "fp16" in str(e)
            raised += 1
            continue
        assert torch.isfinite(c.reconstruct(rec)).all()
        assert rel_err(c, x * scale) < base * 1.1 + 1e-4
    assert raised or name == "bf16" or name == "q8"  # only these store no fp16 of the scale 1e6 needs


@pytest.mark.parametrize("name", NAMES)
def test_scale_invariance_and_tiny_norms(name):
    c = build(name)
    x = data((64, 2, 128), seed=5)
    assert rel_err(c, x * 1e-3) < rel_err(c, x) * 1.1 + 1e-4
    tiny = c.reconstruct(c.encode(x * 1e-9))  # below fp16 subnormals: flushed to ~0, never garbage
    assert torch.isfinite(tiny).all() and tiny.abs().max() < 1e-6


@pytest.mark.parametrize("name", NAMES)
def test_input_dtypes(name):
    """fp16 / bf16 / fp32 inputs give the records of their float32 values."""
    c = build(name)
    x = data((8, 2, 128), seed=6)
    for dt in (torch.float16, torch.bfloat16):
        xd = x.to(dt)
        assert torch.equal(c.encode(xd), c.encode(xd.float()))


@pytest.mark.parametrize("name", NAMES)
def test_seeded(name):
    x = data((16, 2, 128), seed=7)
    a, b, other = (build(name, seed=s).encode(x) for s in (3, 3, 4))
    assert torch.equal(a, b)
    if name not in ("bf16", "q8", "q4"):
        assert not torch.equal(a, other)


def test_keys_only_flag():
    from tqinfer.quant import cache_type

    assert cache_type("qjl").keys_only and not cache_type("tq3").keys_only


def test_wrong_shapes_rejected():
    c = build("tq3")
    with pytest.raises(ValueError, match="head_dim 128"):
        c.encode(data((2, 2, 64)))
    with pytest.raises(ValueError, match="records"):
        c.decode(torch.zeros(2, 2, 51, dtype=torch.uint8))
    s = build("tq2.5", heads=2)
    with pytest.raises(ValueError, match="2 heads"):
        s.encode(data((2, 3, 128)))


DIMS = [16, 32, 48, 64, 96, 128]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(NAMES), d=st.sampled_from(DIMS), heads=st.integers(1, 3),
       lead=st.lists(st.integers(1, 3), max_size=2), seed=st.integers(0, 1000))
def test_any_shape(name, d, heads, lead, seed):
    try:
        c = make_codec(name, d, heads, seed=seed)
    except ValueError as e:  # a type that needs d divisible by its block says so
        assert "head_dim" in str(e) or "outlier" in str(e)
        return
    if c.needs_calibration:
        c.calibrate(data((32, heads, d), seed=seed))
    x = data((*lead, heads, d), seed=seed)
    rec = c.encode(x)
    assert rec.shape == (*lead, heads, c.record_bytes) and c.record_bytes % 2 == 0
    xh = c.reconstruct(rec)
    assert xh.shape == x.shape and torch.isfinite(xh).all()
    q = data((*lead, heads, d), seed=seed + 1, dtype=torch.float64)
    y = c.decode_rotated(rec).double()
    assert torch.allclose((c.rotate(q) * y).sum(-1), (q * c.unrotate(y)).sum(-1), rtol=1e-9, atol=1e-9)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", NAMES)
def test_cuda_matches_cpu(name):
    """Same seed, same codec on both devices: CUDA decodes CPU records to the same vectors, and CUDA
    encodes to the same codes except where GEMM rounding flips a coordinate at a cell boundary."""
    c = build(name)
    x = data((512, 2, 128), seed=8)
    rec_cpu = c.encode(x)
    rec_gpu = c.encode(x.cuda())
    assert rec_gpu.is_cuda
    assert torch.allclose(c.reconstruct(rec_cpu.cuda()).cpu(), c.reconstruct(rec_cpu), atol=1e-4, rtol=1e-4)
    same = (rec_gpu.cpu() == rec_cpu).all(-1).float().mean().item()
    assert same > 0.97
    q = data((512, 2, 128), seed=9)
    assert torch.allclose(reference_scores(c, q.cuda(), rec_cpu.cuda()).cpu(),
                          reference_scores(c, q, rec_cpu), atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("name", ["tq1", "tq2", "tq3", "tq4", "tq2.5", "tq3.5"])
def test_byte_lookup_equals_unpack_then_centroids(name):
    """The per-byte centroid tables (the twin's hot loop) give exactly unpack -> c[idx]."""
    from tqinfer.quant.packing import unpack
    from tqinfer.quant.registry import make_codec
    from tqinfer.quant.turboquant import TurboQuantSplit

    codec = make_codec(name, 128, 2, seed=3)
    parts = [codec.a, codec.b] if isinstance(codec, TurboQuantSplit) else [codec]
    g = torch.Generator().manual_seed(4)
    for q in parts:
        codes = torch.randint(0, 256, (33, 2, q.code_bytes), dtype=torch.uint8, generator=g)
        norms = torch.rand(33, 2, generator=g)
        expected = q.centroids_of(unpack(codes, q.bits, q.dim)) * norms.unsqueeze(-1)
        assert torch.equal(q.values(codes, norms), expected)
