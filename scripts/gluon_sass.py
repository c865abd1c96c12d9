"""The SASS of the Gluon decode split kernel's tile loop, compiled for sm_90 on a machine without a GPU:
registers, spill stack, and the loop's instruction count and opcode histogram for one cache type and
shape. The loop (one warp's 16-token slice of a tile) is the largest backward branch of the kernel.

It is how the decode kernel's instruction budget was read between GPU runs (docs/BENCHMARKS.md): the
integer pipe (PRMT, LOP3, SHF ...) bounds the kernel, so its count per loop is a first check of a change.
Counts are what the installed triton's ptxas emits; the H200 runs triton 3.6, so compile in an
environment with triton 3.6 to compare with the recorded numbers (scripts/check_kernels_compile.py says
how).

    PYTHONPATH=. python scripts/gluon_sass.py tq3.5                       # 8B shape: d 128, 4 query heads a group
    PYTHONPATH=. python scripts/gluon_sass.py tq4 --d 64 --g 3 --cap 96 --pipeline on --dump /tmp/tq4.sass
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from triton.backends.compiler import GPUTarget  # noqa: E402

import check_kernels_compile as ck  # noqa: E402
from tqinfer.kernels import decode_attention as da  # noqa: E402


def split_launch(kind: str, d: int, g: int):
    """The Gluon split kernel's launch for one sequence of `kind` (KV heads 8 at d 128, 3 at d 64)."""
    h = 8 if d == 128 else 3
    try:
        calls = ck.gluon_decode_launches(ck.paged_view(kind, h, d, 300), h, g, d)
    except ValueError as e:  # records the Gluon kernel does not read
        sys.exit(f"{kind} at d {d}, g {g}: {e}")
    return next(c for c in calls if c[0].fn.__name__ == "_decode_split_gluon")


def tile_loop(sass: str) -> list[str]:
    """The instructions of the largest backward branch's span (the tile loop) of cuobjdump -sass text."""
    ins = {}
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            ins[int(m.group(1), 16)] = m.group(2)
    spans = [(at - int(m.group(1), 16), int(m.group(1), 16), at) for at, text in ins.items()
             if (m := re.search(r"BRA 0x([0-9a-f]+)", text)) and int(m.group(1), 16) < at]
    if not spans:
        return []
    _, lo, hi = max(spans)
    return [ins[a] for a in sorted(ins) if lo <= a <= hi]


def opcode(text: str) -> str:
    """An instruction's opcode without predicate and modifiers ('@!P0 LDG.E.U16 R1, ...' -> 'LDG')."""
    m = re.match(r"(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", text.strip())
    return m.group(1) if m else "?"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("kind", help="cache type the Gluon kernel reads: tq4, tq3.5, tq3")
    p.add_argument("--d", type=int, default=128, help="head_dim (64 or 128)")
    p.add_argument("--g", type=int, default=4, help="query heads a KV group (at most 8)")
    p.add_argument("--cap", type=int, default=None, help="ptxas register cap (decode_attention.GLUON_MAXNREG)")
    p.add_argument("--pipeline", choices=["on", "off"], default=None, help="GLUON_PIPELINE (default: the rule)")
    p.add_argument("--arch", type=int, default=90, help="compute capability (90: H100 / H200)")
    p.add_argument("--dump", default=None, help="write the whole SASS here")
    args = p.parse_args()
    if args.cap is not None:
        da.GLUON_MAXNREG = args.cap
    if args.pipeline is not None:
        da.GLUON_PIPELINE = args.pipeline == "on"
    compiled = ck.compile_launch(*split_launch(args.kind, args.d, args.g), GPUTarget("cuda", args.arch, 32))
    sass = ck.cuobjdump(compiled, "-sass")
    if sass is None:
        sys.exit("this triton ships no cuobjdump: no SASS to read")
    if args.dump:
        with open(args.dump, "w") as f:
            f.write(sass)
    usage = re.search(r"REG:\d+ STACK:\d+ SHARED:\d+", ck.cuobjdump(compiled, "-res-usage") or "")
    loop = tile_loop(sass)
    ops = collections.Counter(opcode(t) for t in loop)
    print(f"{args.kind} d {args.d} g {args.g}: {usage.group(0) if usage else '?'}; tile loop {len(loop)} instructions")
    print(" ".join(f"{o}:{c}" for o, c in ops.most_common()))
    return 0 if loop else 1


if __name__ == "__main__":
    sys.exit(main())
