"""Every Triton kernel the engine launches on CUDA compiles for sm_90 (H100 / H200) with the installed
triton, on this machine without a GPU. The kernel tests run under the Triton interpreter, which accepts
programs the real compiler rejects: a prefill change passed them all, then failed to compile on the
H200 (docs/BENCHMARKS.md, 2026-11-30)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

try:
    from triton.experimental import gluon as GLUON
except ImportError:  # pragma: no cover - depends on the installed triton
    GLUON = None

ROOT = Path(__file__).resolve().parents[1]


def _compile_env() -> dict:
    """The environment of a compiling script: without TRITON_INTERPRET (the interpreter compiles nothing),
    the repository on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90():
    env = _compile_env()
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_kernels_compile.py")], env=env,
                         capture_output=True, text=True, timeout=1200)
    report = run.stdout[-4000:] + run.stderr[-4000:]
    assert run.returncode == 0, report
    assert run.stdout.rstrip().endswith("0 failed"), report
    # decode (3 kernels), prefill (2 lookups), quantize (3 launches) per compressed type and shape, the fused
    assert run.stdout.count(": REG:") + run.stdout.count(": compiled") >= 80, report


@pytest.mark.slow
def test_gluon_sass_counts_the_tile_loop():
    """scripts/gluon_sass.py finds the Gluon split kernel's tile loop in its sm_90 SASS: a loop of a few
    hundred instructions with the PRMT lookups and the mma instructions in it; and it names the records
    the kernel does not read instead of compiling something else."""
    if GLUON is None:
        pytest.skip("triton without Gluon")
    import triton
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")):
        pytest.skip("this triton ships no cuobjdump: no SASS to read")
    env = _compile_env()
    script = str(ROOT / "scripts" / "gluon_sass.py")
    run = subprocess.run([sys.executable, script, "tq4", "--d", "64", "--g", "3"], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    m = re.search(r"REG:(\d+) STACK:\d+ SHARED:\d+; tile loop (\d+) instructions", run.stdout)
    assert m and 0 < int(m.group(1)) <= 255 and 150 <= int(m.group(2)) <= 3000, run.stdout
    ops = dict(x.split(":") for x in run.stdout.strip().splitlines()[-1].split())
    assert int(ops["PRMT"]) > 0 and int(ops["HMMA"]) > 0 and int(ops["BRA"]) >= 1, run.stdout
    bad = subprocess.run([sys.executable, script, "tq2"], env=env, capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "tq2" in bad.stderr and "Gluon" in bad.stderr, bad.stderr[-2000:]
