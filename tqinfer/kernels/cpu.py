"""Attention over TurboQuant records on the CPU, in C: cpu_attention.c compiled for each record layout
by the system's C compiler (like torch.compile's CPU backend, which needs one too), cached on disk and
called through ctypes.

The torch twin decodes a step's compressed prefix in several passes over multi-MB intermediates (code
indices, looked-up centroids); the C kernel decodes sixteen codes per vector instruction in registers
and never writes them out, so a decode step at 6k context spends milliseconds, not tens of
milliseconds, on its cache. Same math as the twin (tests/kernels/test_cpu_attention.py holds them to
float64 attention); a layout or machine the kernel does not cover (no compiler, QJL records,
parts whose width is not a multiple of 16) keeps the twin, and TQINFER_KERNELS=torch forces it.

Compiled libraries live in cache_dir()/cpu-kernels, one per (source, layout, compiler, CPU flags):
the first use of a layout costs one compile (0.14-0.18 s measured), later processes load the file.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import warnings
from functools import lru_cache
from pathlib import Path

import torch

from tqinfer.kernels import dispatch
from tqinfer.quant.turboquant import mse_parts

SOURCE = Path(__file__).with_name("cpu_attention.c")
FLAGS = ["-O3", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=fast"]
# tried in order: OpenMP threads and this CPU's vector units, then without OpenMP, then portable code
VARIANTS = (["-march=native", "-fopenmp"], ["-march=native"], [])
MAX_HEAD_DIM = 512
MAX_GROUP = 16

_lock = threading.Lock()
_failed: set[str] = set()


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


@lru_cache(maxsize=None)
def _toolchain_id(cc: str) -> str:
    """The compiler's version line and this CPU's feature flags: a library built with -march=native on
    one machine must not be loaded on another sharing the cache directory."""
    try:
        version = subprocess.run([*shlex.split(cc), "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu += next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return version.split("\n")[0] + "|" + cpu


def _defines(layout: tuple, dim: int, group: int) -> list[str]:
    out = [f"-DTQ_D={dim}", f"-DTQ_G={group}", f"-DTQ_PARTS={len(layout)}"]
    for k, (channel, width, bits, planes, scale) in enumerate(layout):
        out += [f"-DTQ_P{k}_CH={channel}", f"-DTQ_P{k}_DIM={width}", f"-DTQ_P{k}_BITS={bits}",
                f"-DTQ_P{k}_PLANES={planes}", f"-DTQ_P{k}_SCALE={scale}"]
    return out


def _fallback(key: str, why: str) -> None:
    """Remember a layout the kernel cannot serve here and say why, once."""
    _failed.add(key)
    warnings.warn(f"the CPU attention kernel is not available ({why}); decoding over compressed caches "
                  "uses the slower torch path", stacklevel=5)


def _build(cc: str, defines: list[str], path: Path) -> str | None:
    """Compile the source to `path` (atomically: a concurrent process sees the whole file or none);
    None, or the last line the compiler said for the last variant tried."""
    said = ""
    for extra in VARIANTS:
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
        os.close(fd)
        try:
            run = subprocess.run([*shlex.split(cc), *FLAGS, *extra, *defines, "-o", tmp, str(SOURCE), "-lm"],
                                 capture_output=True, text=True, timeout=120)
            if run.returncode == 0:
                os.replace(tmp, path)
                return None
            said = (run.stderr.strip().splitlines() or [f"exit status {run.returncode}"])[-1]
        except (OSError, subprocess.SubprocessError) as e:
            said = str(e)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return said


def library_path(layout: tuple, dim: int, group: int, cc: str) -> Path:
    """Where the library of this layout lives: cache_dir()/cpu-kernels, named by a hash of the source,
    the layout, the flags, the compiler and this CPU."""
    from tqinfer.hub import cache_dir

    text = b"\0".join([SOURCE.read_bytes(), " ".join(_defines(layout, dim, group) + FLAGS).encode(), cc.encode(),
                        _toolchain_id(cc).encode()])
    return cache_dir() / "cpu-kernels" / f"tq_attention_{hashlib.sha256(text).hexdigest()[:24]}.so"


def _library(layout: tuple, dim: int, group: int) -> ctypes.CDLL | None:
    """The compiled kernel for this layout, from the disk cache or compiled now; None (said once) where
    no compiler builds it, the cache directory is not writable or the library does not load."""
    cc = _compiler()
    if cc is None:
        if "no compiler" not in _failed:
            _fallback("no compiler", "no C compiler: set CC or install cc / gcc / clang")
        return None
    defines = _defines(layout, dim, group)
    path = library_path(layout, dim, group, cc)
    key = path.name
    if key in _failed:
        return None
    with _lock:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            for attempt in range(2):
                if not path.exists():
                    said = _build(cc, defines, path)
                    if said is not None:
                        _fallback(key, f"{cc} did not compile it: {said}")
                        return None
                try:
                    lib = ctypes.CDLL(str(path))
                    break
                except OSError:  # a damaged file in the cache: build it again, once
                    if attempt:
                        raise
                    path.unlink()
        except OSError as e:
            _fallback(key, f"{path.parent}: {e}")
            return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.tq_scores.argtypes = [ptr, ptr, i64, i64, i64, i64, i64, ptr, ptr, ptr, i64]
    lib.tq_values.argtypes = [ptr, ptr, i64, i64, i64, i64, i64, ptr, i64, ptr, ptr, ptr, i64]
    lib.tq_values_rotated.argtypes = [ptr, ptr, i64, i64, i64, i64, i64, ptr, ptr]
    f32 = ctypes.c_float
    lib.tq_decode_weights.argtypes = [ptr, ptr, f32, ptr, ptr, i64, i64, ptr, ptr, i64,
                                      ptr, ptr, i64, i64, i64, i64, i64, ptr, ptr, ptr, ptr]
    for f in (lib.tq_scores, lib.tq_values, lib.tq_values_rotated, lib.tq_decode_weights):
        f.restype = None
    return lib


def _layout(codec) -> tuple | None:
    """(channel, dim, bits, planes, scale) per MSE part, or None where the kernel cannot read the
    records (QJL signs, other codec families, part widths that are not multiples of 16)."""
    if codec is None or getattr(codec, "has_qjl", False):
        return None
    try:
        parts = mse_parts(codec)
    except NotImplementedError:
        return None
    out = tuple((p.channel, p.quantizer.dim, p.quantizer.bits, p.planes, p.scale) for p in parts)
    if not all(1 <= bits <= 4 and width % 16 == 0 for _, width, bits, _, _ in out):
        return None
    return out


class CpuAttention:
    """One codec's records read by the C kernel for query groups of `group` heads (see the module
    docstring). Every method reads tokens [t0, t0 + n) of one sequence, all heads, from pool
    [blocks, H, BS, R] uint8 through `table` (that sequence's int32 block ids)."""

    def __init__(self, lib: ctypes.CDLL, codec, group: int):
        self.lib, self.dim, self.group = lib, codec.dim, group
        self.centroids = torch.cat([p.quantizer.centroids64.float() for p in mse_parts(codec)]).contiguous()

    @staticmethod
    def _pool_args(pool: torch.Tensor, table: torch.Tensor, t0: int, n: int):
        _, h, bs, r = pool.shape
        _check(pool.dtype == torch.uint8 and pool.is_contiguous() and table.dtype == torch.int32
               and table.stride(-1) == 1, "the CPU kernel reads contiguous uint8 pools through int32 block tables")
        _check(0 <= t0 and n >= 0 and (t0 + n + bs - 1) // bs <= table.shape[-1],
               f"tokens [{t0}, {t0 + n}) are past the block table's {table.shape[-1]} blocks of {bs}")
        return pool.data_ptr(), table.data_ptr(), h, bs, r

    def _rows(self, x: torch.Tensor, h: int, n: int, name: str) -> None:
        """x [H, group, n] float32 whose rows may be strided (a wider buffer's first n columns)."""
        _check(x.dtype == torch.float32 and tuple(x.shape) == (h, self.group, n) and x.stride(-1) == 1
               and x.stride(0) == self.group * x.stride(1), f"{name} must be float32 [{h}, {self.group}, {n}] rows")

    def scores(self, pool, table, t0: int, n: int, q: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Rotated queries q [H, group, d] float32 (contiguous) -> out [H, group, n] (row stride may
        exceed n) of <q, rotated values> per token: norms applied, no softmax scale."""
        p_pool, p_table, h, bs, r = self._pool_args(pool, table, t0, n)
        _check(q.is_contiguous() and q.dtype == torch.float32 and tuple(q.shape) == (h, self.group, self.dim),
               f"queries must be contiguous float32 [{h}, {self.group}, {self.dim}]")
        self._rows(out, h, n, "out")
        self.lib.tq_scores(p_pool, p_table, t0, n, h, bs, r, q.data_ptr(), self.centroids.data_ptr(),
                           out.data_ptr(), out.stride(1))
        return out

    def values(self, pool, table, t0: int, n: int, p: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Probabilities p [H, group, n] float32 (rows may be strided) -> out [H, group, d] = their
        weighted sum of the tokens' rotated values."""
        p_pool, p_table, h, bs, r = self._pool_args(pool, table, t0, n)
        self._rows(p, h, n, "p")
        _check(out.is_contiguous() and out.dtype == torch.float32 and tuple(out.shape) == (h, self.group, self.dim),
               f"out must be contiguous float32 [{h}, {self.group}, {self.dim}]")
        # the units' partial sums: a fresh buffer per call (callers on other threads share this object)
        # whose capacity the C side respects, whatever thread count its OpenMP runtime reports
        chunks = max(1, torch.get_num_threads())
        work = torch.empty(h * chunks * self.group * self.dim, dtype=torch.float32)
        self.lib.tq_values(p_pool, p_table, t0, n, h, bs, r, p.data_ptr(), p.stride(1),
                           self.centroids.data_ptr(), out.data_ptr(), work.data_ptr(), chunks)
        return out

    def decode_weights(self, q: torch.Tensor, scale: float, rot: torch.Tensor, k_hot: torch.Tensor,
                       v_hot: torch.Tensor, nh: int, k1: torch.Tensor, v1: torch.Tensor, pool, table, t0: int, n: int):
        """A decode token's softmax over its sequence's hot rows (k_hot / v_hot [H, rows, d], the first
        nh valid; k1 / v1 [H, d] the token's own), and the records of tokens [t0, t0 + n) (this codec's:
        the keys', rotated by rot [H, d, d] float32, turboquant.rotation_matrices), in one call:
        -> (p [H, group, n] the records' weights, o_hot [H, group, d] the hot rows' weighted values,
        original space). q [H, group, d] float32, unscaled (original space)."""
        p_pool, p_table, h, bs, r = self._pool_args(pool, table, t0, n)
        _check(q.is_contiguous() and q.dtype == torch.float32 and tuple(q.shape) == (h, self.group, self.dim),
               f"queries must be contiguous float32 [{h}, {self.group}, {self.dim}]")
        dtype = k_hot.dtype
        _check(dtype in (torch.bfloat16, torch.float32) and all(
            t.dtype == dtype and t.is_contiguous() for t in (k_hot, v_hot, k1, v1))
            and k_hot.shape == v_hot.shape and k_hot.shape[0] == h and k_hot.shape[2] == self.dim
            and 0 <= nh <= k_hot.shape[1] and tuple(k1.shape) == tuple(v1.shape) == (h, self.dim),
            "hot rows and the token must be contiguous bf16 or float32 [H, rows, d] / [H, d] alike")
        _check(rot.dtype == torch.float32 and rot.is_contiguous() and tuple(rot.shape) == (h, self.dim, self.dim),
               f"the rotation must be contiguous float32 [{h}, {self.dim}, {self.dim}]")
        scores = torch.empty(h * self.group * (nh + 1 + n), dtype=torch.float32)
        p = torch.empty(h, self.group, n, dtype=torch.float32)
        o_hot = torch.empty(h, self.group, self.dim, dtype=torch.float32)
        self.lib.tq_decode_weights(q.data_ptr(), rot.data_ptr(), scale, k_hot.data_ptr(), v_hot.data_ptr(),
                                   k_hot.shape[1], nh, k1.data_ptr(), v1.data_ptr(), int(dtype == torch.bfloat16),
                                   p_pool, p_table, t0, n, h, bs, r, self.centroids.data_ptr(), scores.data_ptr(),
                                   p.data_ptr(), o_hot.data_ptr())
        return p, o_hot

    def values_rotated(self, pool, table, t0: int, n: int, out: torch.Tensor) -> torch.Tensor:
        """out [H, n, d] float32 (contiguous) = the tokens' rotated values (a prefill tile)."""
        p_pool, p_table, h, bs, r = self._pool_args(pool, table, t0, n)
        _check(out.is_contiguous() and out.dtype == torch.float32 and tuple(out.shape) == (h, n, self.dim),
               f"out must be contiguous float32 [{h}, {n}, {self.dim}]")
        self.lib.tq_values_rotated(p_pool, p_table, t0, n, h, bs, r, self.centroids.data_ptr(), out.data_ptr())
        return out


def _check(ok: bool, message: str) -> None:
    """Raw pointers go to C next: a wrong shape must stop here (not an assert: python -O drops those)."""
    if not ok:
        raise ValueError(message)


_kernels: dict[tuple, CpuAttention | None] = {}


def cpu_attention(codec, group: int, device: torch.device) -> CpuAttention | None:
    """The C kernel for this codec's records and query group on the CPU, or None (the twin runs)."""
    if device.type != "cpu" or not dispatch.kernels_enabled() or codec is None:
        return None
    mine = codec.__dict__.setdefault("_cpu_attention", {})  # asked per layer and step: keep it at hand
    if group not in mine:
        layout = _layout(codec)
        ok = layout is not None and codec.dim % 16 == 0 and codec.dim <= MAX_HEAD_DIM and group <= MAX_GROUP
        key = (layout, codec.dim, group, tuple(tuple(p.quantizer.centroids64.tolist()) for p in mse_parts(codec))) \
            if ok else None
        if ok and key not in _kernels:
            lib = _library(layout, codec.dim, group)
            _kernels[key] = None if lib is None else CpuAttention(lib, codec, group)
        mine[group] = _kernels[key] if ok else None
    return mine[group]
