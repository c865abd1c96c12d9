"""Rotations: orthogonal, seeded, and the fast transform equal to its dense matrix."""

import pytest
import torch

from tqinfer.quant.rotation import Rotation, fwht, hadamard, haar_orthogonal


@pytest.mark.parametrize("kind", ["hadamard", "orthogonal"])
@pytest.mark.parametrize("dim", [16, 64, 96, 128, 256])
def test_orthogonal_fp32(kind, dim):
    p = Rotation(dim, seed=3, kind=kind).matrix(dtype=torch.float32)
    assert torch.linalg.matrix_norm(p.T @ p - torch.eye(dim)) < 1e-5


@pytest.mark.parametrize("kind", ["hadamard", "orthogonal"])
@pytest.mark.parametrize("dim", [64, 96, 128, 1024])  # 1024: the FWHT path
def test_apply_matches_matrix_and_inverts(kind, dim):
    rot = Rotation(dim, seed=11, kind=kind)
    x = torch.randn(5, 2, dim, dtype=torch.float64)
    y = rot.apply(x)
    assert torch.allclose(y, x @ rot.matrix64.T, atol=1e-12)
    assert torch.allclose(rot.inverse(y), x, atol=1e-12)
    x32 = x.float()
    assert torch.allclose(rot.inverse(rot.apply(x32)), x32, atol=1e-5)


def test_fwht_is_hadamard_product():
    x = torch.randn(3, 32, dtype=torch.float64)
    assert torch.allclose(fwht(x), x @ hadamard(32))


def test_non_power_of_two_falls_back_to_dense():
    assert Rotation(96, seed=0, kind="hadamard").kind == "orthogonal"
    assert Rotation(128, seed=0, kind="hadamard").kind == "hadamard"


def test_seeded():
    a, b, c = (Rotation(128, s, "orthogonal").matrix64 for s in (5, 5, 6))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    a, b, c = (Rotation(128, s, "hadamard").matrix64 for s in (5, 5, 6))
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_haar_sign_correction():
    # without folding R's diagonal signs in, QR of a Gaussian has a biased diagonal (mostly negative in
    # LAPACK's convention); Haar matrices have diagonal entries of mean 0, variance 1/d
    diag = torch.stack([torch.diagonal(haar_orthogonal(16, s)) for s in range(400)])
    assert abs(diag.mean().item()) < 4 * (1 / 16 / diag.numel()) ** 0.5


def test_unknown_kind():
    with pytest.raises(ValueError, match="hadamard"):
        Rotation(64, 0, "givens")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["hadamard", "orthogonal"])
def test_same_on_cpu_and_cuda(kind):
    rot = Rotation(128, seed=9, kind=kind)
    assert torch.equal(rot.matrix("cuda").cpu(), rot.matrix("cpu"))
    x = torch.randn(64, 128)
    assert torch.allclose(rot.apply(x.cuda()).cpu(), rot.apply(x), atol=1e-5)
