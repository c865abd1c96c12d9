"""Compile every Triton (and Gluon) kernel the engine launches on CUDA for a GPU target, without a GPU.

The kernel tests run under the Triton interpreter on machines without a GPU, and the interpreter
accepts programs that a compiler for the real target rejects (a triton 3.6 pass failure on the H200,
2026-11-30, for a prefill change that passed every interpreter test). This script calls the engine's
host functions on CPU tensors, catches each kernel launch instead of running it, and compiles what it
caught for the target with the installed triton (its own ptxas): it prints registers, spill stack and
shared memory per kernel and exits 1 if any fails.

    PYTHONPATH=. python scripts/check_kernels_compile.py            # every case, sm_90 (H100 / H200)
    PYTHONPATH=. python scripts/check_kernels_compile.py --quick    # one cache type per kernel family

Against the GPU machine's triton (3.6 there; the venv may hold another), in a side environment:

    python3 -m venv /tmp/tr36 && /tmp/tr36/bin/pip install "torch>=2.11,<2.14" triton==3.6.0 numpy
    PYTHONPATH=. /tmp/tr36/bin/python scripts/check_kernels_compile.py

Register counts here are indicative only: the launch on a GPU also specializes pointer alignment and
integer arguments, which this compile does not.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
try:  # Gluon kernels (decode_gluon) need its compile source; a triton without it checks the Triton ones
    from triton.experimental.gluon._runtime import GluonASTSource, GluonJITFunction  # noqa: E402
except ImportError:  # pragma: no cover - depends on the installed triton
    GluonASTSource = GluonJITFunction = None

from tqinfer.cache.paged import LayerCacheView  # noqa: E402
from tqinfer.kernels import decode_attention, fused_triton, prefill_attention, quantize  # noqa: E402
from tqinfer.kernels.quantize import record_layout  # noqa: E402
from tqinfer.quant.registry import make_codec  # noqa: E402

POINTERS = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.uint8: "*u8",
            torch.int32: "*i32", torch.int64: "*i64"}
OPTIONS = ("num_warps", "num_stages", "maxnreg", "launch_pdl")


class _Caught:
    """Stands in for a @triton.jit kernel: `kernel[grid](...)` records the call instead of launching."""

    def __init__(self, kernel, calls: list):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.kernel, args, kwargs))


def catch(module, names: list[str], call) -> list:
    """The launches of module.<names> (module: one module or a list; each name is taken from the first
    that has it) that call() makes."""
    mods = module if isinstance(module, (list, tuple)) else [module]
    owner = {n: next(m for m in mods if hasattr(m, n)) for n in names}
    calls, saved = [], {n: getattr(owner[n], n) for n in names}
    for n in names:
        setattr(owner[n], n, _Caught(saved[n], calls))
    try:
        call()
    finally:
        for n, kernel in saved.items():
            setattr(owner[n], n, kernel)
    return calls


def with_setting(name: str, value, call, module=decode_attention):
    """call() (its result returned) with `module`'s attribute `name` set to `value`."""
    def run():
        old = getattr(module, name)
        setattr(module, name, value)
        try:
            return call()
        finally:
            setattr(module, name, old)
    return run


def with_pdl(call):
    """call() with decode attention's programmatic dependent launches on, as on an H200 (the CPU has none)."""
    return with_setting("DECODE_PDL", True, call)


def fused_pdl(call):
    """call() with fused_triton's kernels launching early (PDL), as on an H200."""
    return with_setting("PDL", True, call, fused_triton)


def as_on_cuda(call):
    """call() with decode_attention.gluon_reads judging the records alone (gluon_layouts), as on CUDA, so
    the launch of the Gluon split kernel (compiled CUDA code only) is made and caught here on the CPU."""
    def run():
        reads = decode_attention.gluon_reads
        decode_attention.gluon_reads = lambda k, v, d, g, bs, device: decode_attention.gluon_layouts(k, v, d, g, bs)
        try:
            call()
        finally:
            decode_attention.gluon_reads = reads
    return with_pdl(run)


def compile_launch(kernel, args, kwargs, target):
    """Compile one caught launch for `target` (the launch's options, its tensors as pointers, its ints
    unspecialized): triton's compiled kernel, its cubin in .asm["cubin"]."""
    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in OPTIONS if k in kwargs}
    values = list(args) + [kwargs[n] for n in kernel.arg_names[len(args):]]
    signature, constants = {}, {}
    for name, value, param in zip(kernel.arg_names, values, kernel.params):
        if param.is_constexpr:
            signature[name], constants[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = POINTERS[value.dtype]
        else:
            signature[name] = "fp32" if isinstance(value, float) else "i32"
    source = GluonASTSource if GluonJITFunction is not None and isinstance(kernel, GluonJITFunction) else ASTSource
    return triton.compile(source(kernel, signature, constants), target=target, options=options)


def cuobjdump(compiled, flag: str) -> str | None:
    """cuobjdump's output for a compiled kernel's cubin (flag: "-res-usage", "-sass"); None where the
    installed triton ships no cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True).stdout


def compile_caught(kernel, args, kwargs, target) -> str:
    """Compile one caught launch for `target`: 'REG:r STACK:s SHARED:m' from cuobjdump."""
    usage = cuobjdump(compile_launch(kernel, args, kwargs, target), "-res-usage")
    m = re.search(r"REG:\d+ STACK:\d+ SHARED:\d+", usage or "")
    return m.group(0) if m else "compiled"


GLUON_DECODE = ["_decode_split_gluon", "_decode_merge_kernel", "_decode_queries_kernel"]  # a Gluon decode's launches


def gluon_decode_launches(view, heads: int, g: int, d: int) -> list:
    """The launches (GLUON_DECODE) of one Gluon decode call of a sequence of 300 tokens in `view`, g query
    heads a group, caught on the CPU as on CUDA."""
    x = torch.bfloat16
    q, k = torch.zeros(1, heads * g, d, dtype=x), torch.zeros(1, heads, d, dtype=x)
    one, lens = torch.arange(2, dtype=torch.int32), torch.tensor([300], dtype=torch.int32)
    return catch([decode_attention, decode_attention.decode_gluon], GLUON_DECODE, as_on_cuda(
        lambda: decode_attention.paged_decode_attention(q, k, k.clone(), one, lens, view, 0.1, kernel="gluon")))


def paged_view(kind: str, heads: int, d: int, tokens: int, bs: int = 64, sinks: int = 4, window: int = 128):
    """A one-sequence paged cache of `kind` on the CPU (contents do not matter: nothing runs)."""
    blocks = -(-tokens // bs) + 1
    table = torch.arange(blocks - 1, dtype=torch.int32).view(1, -1)
    if kind == "bf16":
        pool = torch.zeros(blocks, heads, bs, d, dtype=torch.bfloat16)
        return LayerCacheView(pool, pool.clone(), None, None, table, torch.zeros(1, dtype=torch.int32), 0, 0, bs,
                              None, None)
    kc, vc = make_codec(kind, d, heads, seed=1), make_codec(kind, d, heads, seed=2)
    kp = torch.zeros(blocks, heads, bs, kc.record_bytes, dtype=torch.uint8)
    vp = torch.zeros(blocks, heads, bs, vc.record_bytes, dtype=torch.uint8)
    hot = torch.zeros(1, heads, sinks + window, d, dtype=torch.bfloat16)
    return LayerCacheView(kp, vp, hot, hot.clone(), table, torch.zeros(1, dtype=torch.int32), sinks, window, bs,
                          kc, vc)


def cases(quick: bool):
    """(label, module, kernel names, call) for every kernel family and cache type."""
    kinds = ["tq3.5", "bf16"] if quick else ["tq3.5", "tq4", "tq3", "tq2.5", "tqp3", "bf16"]
    shapes = [(8, 4, 128)] if quick else [(8, 4, 128), (3, 3, 64)]  # KV heads, group, head_dim
    x = torch.bfloat16
    for kind in kinds:
        for h, g, d in shapes:
            view = paged_view(kind, h, d, 300)
            q, k = torch.zeros(1, h * g, d, dtype=x), torch.zeros(1, h, d, dtype=x)
            one, lens = torch.arange(2, dtype=torch.int32), torch.tensor([300], dtype=torch.int32)
            yield (f"decode {kind} d{d}", decode_attention,
                   ["_decode_split_kernel", "_decode_merge_kernel", "_decode_queries_kernel"],
                   with_pdl(lambda: decode_attention.paged_decode_attention(q, k, k.clone(), one, lens, view, 0.1)))
            if kind != "bf16":  # the merge that writes the new token into its hot row (a decode step's)
                yield (f"decode {kind} d{d} writing the hot row", decode_attention,
                       ["_decode_split_kernel", "_decode_merge_kernel", "_decode_queries_kernel"],
                       with_pdl(lambda: decode_attention.paged_decode_attention(
                           q, k, k.clone(), one, lens, view, 0.1, enter=torch.zeros(1, dtype=torch.int64))))
            k_lay, v_lay = decode_attention._layouts(view, "cpu")
            if GluonJITFunction and decode_attention.gluon_layouts(k_lay, v_lay, d, g, view.block_size):
                for gg in (g, 8) if d == 128 else (g,):  # and 8 query heads a group: the most registers
                    yield (f"decode gluon {kind} d{d} g{gg}", None, None,
                           lambda gg=gg, view=view, h=h, d=d: gluon_decode_launches(view, h, gg, d))
                yield (f"decode gluon {kind} d{d} g{g} warps merged in registers", None, None,  # a variant switch
                       with_setting("GLUON_SMEM_MERGE", False,
                                    lambda view=view, h=h, d=d, g=g: gluon_decode_launches(view, h, g, d)))
            if kind != "bf16":
                yield (f"decode pairs {kind} d{d}", decode_attention,
                       ["_decode_split_kernel", "_decode_merge_kernel", "_decode_queries_kernel"],
                       lambda: decode_attention.paged_decode_attention(q, k, k.clone(), one, lens, view, 0.1,
                                                                       lookup="pair"))
            qp, kp = torch.zeros(64, h * g, d, dtype=x), torch.zeros(64, h, d, dtype=x)
            cu = torch.tensor([0, 64], dtype=torch.int32)
            yield (f"prefill {kind} d{d}", prefill_attention, ["_prefill_kernel"],
                   lambda: prefill_attention.paged_prefill_attention(qp, kp, kp.clone(), cu, lens, view, 0.1,
                                                                     method="fused"))
            if kind == "bf16":
                continue
            yield (f"prefill pairs {kind} d{d}", prefill_attention, ["_prefill_kernel"],
                   lambda: prefill_attention.paged_prefill_attention(qp, kp, kp.clone(), cu, lens, view, 0.1,
                                                                     unit_loads="pair", method="fused"))
            if view.k_codec is not None and record_layout(view.k_codec, "cpu").qjl is None:
                lay = record_layout(view.k_codec, "cpu")
                yield (f"dequantize {kind} d{d}", prefill_attention, ["_dequant_kernel"],
                       lambda: prefill_attention.dequantize_records(view.k_pool, lay, view.block_table[0], 4, 100,
                                                                    torch.zeros(h, 100, d, dtype=x)))
            xs, slots = torch.zeros(3, h, d, dtype=x), torch.arange(3)
            yield (f"quantize {kind} d{d}", quantize, ["_quantize_kv_kernel"],
                   lambda: (quantize.write_tokens(view.k_codec, xs, view.k_pool, slots),
                            quantize.write_kv_tokens(view.k_codec, xs, view.k_pool, view.v_codec, xs, view.v_pool,
                                                     slots)))
            i = torch.zeros(1, dtype=torch.int64)
            layer = (view.k_codec, view.v_codec, view.k_hot, view.v_hot, view.k_pool, view.v_pool)
            yield (f"retire_window {kind} d{d}", quantize, ["_quantize_kv_kernel"],
                   lambda: quantize.retire_window([layer, layer], i, i, i))
    rows, hidden, nq, nkv, hd = 4, 576, 9, 3, 64
    yield ("fused add_rms_norm", fused_triton, ["_add_rms_norm_kernel"],
           lambda: fused_triton.add_rms_norm(torch.zeros(rows, hidden, dtype=x), torch.zeros(rows, hidden, dtype=x),
                                             torch.ones(hidden, dtype=x), 1e-5))
    yield ("fused rope_split", fused_triton, ["_rope_split_kernel"],
           lambda: fused_triton.rope_split(torch.zeros(rows, (nq + 2 * nkv) * hd, dtype=x),
                                           torch.zeros(rows, dtype=torch.int64), torch.ones(16, hd // 2),
                                           torch.zeros(16, hd // 2), nq, nkv, hd))
    yield ("fused silu_mul", fused_triton, ["_silu_mul_kernel"],
           lambda: fused_triton.silu_mul(torch.zeros(rows, 2 * 1536, dtype=x)))
    for n, k, bias in ((960, 576, True), (4096, 14336, False)):  # the default model's q/k/v (prefetch), 8B down
        yield (f"fused skinny_linear {n}x{k}", fused_triton, ["_skinny_linear_kernel"],
               fused_pdl(lambda n=n, k=k, bias=bias: fused_triton.skinny_linear(
                   torch.zeros(rows, k, dtype=x), torch.zeros(n, k, dtype=x),
                   torch.zeros(n, dtype=x) if bias else None)))
    yield ("fused kernels, early launch", fused_triton,
           ["_add_rms_norm_kernel", "_rope_split_kernel", "_silu_mul_kernel"],
           fused_pdl(lambda: (fused_triton.add_rms_norm(torch.zeros(rows, hidden, dtype=x), None,
                                                        torch.ones(hidden, dtype=x), 1e-5),
                              fused_triton.rope_split(torch.zeros(rows, (nq + 2 * nkv) * hd, dtype=x),
                                                      torch.zeros(rows, dtype=torch.int64), torch.ones(16, hd // 2),
                                                      torch.zeros(16, hd // 2), nq, nkv, hd),
                              fused_triton.silu_mul(torch.zeros(rows, 2 * 1536, dtype=x)))))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability (90: H100 / H200)")
    p.add_argument("--quick", action="store_true", help="tq3.5 and bf16 at d 128 only")
    args = p.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    decode_attention.GLUON_3BIT_32 = True  # compile every path the Gluon kernel has
    failed = 0
    print(f"triton {triton.__version__}, target sm_{args.arch}")
    for label, module, names, call in cases(args.quick):
        launches = catch(module, names, call) if module is not None else call()  # (None: call() catches)
        if not launches:
            print(f"{label}: no launch caught")
            failed += 1
        for kernel, a, kw in launches:
            try:
                result = compile_caught(kernel, a, kw, target)
            except Exception as e:  # noqa: BLE001 - report every failure, then exit 1
                failed += 1
                result = "FAILED: " + " ".join(str(e).split())[:300]
            print(f"{label} {kernel.fn.__name__}: {result}", flush=True)
    print(f"{failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
