"""scripts/trace_decode.py, the GPU timeline tool: it patches a copy of the kernels with timer stamps by
exact text, so every patch must still apply to the current sources (each text found once) and the patched
modules must parse; its statistics read the stamp slots it documents."""

import ast
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tool():
    spec = importlib.util.spec_from_file_location("trace_decode", os.path.join(ROOT, "scripts", "trace_decode.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_trace_patches_apply_and_parse(tmp_path):
    mod = _tool()
    mod.instrument(str(tmp_path))
    for rel in mod.PATCHES:
        ast.parse((tmp_path / "tqinfer" / rel).read_text())
    gluon = (tmp_path / "tqinfer" / "kernels" / "decode_gluon.py").read_text()
    assert gluon.count("_now(b)") == 7 and "%smid" in gluon  # start, wait x2, loop, end x3
    assert gluon.rstrip().endswith(mod._NOW_GLUON.rstrip())  # the timer helpers after the kernel, not inside it
    merge = (tmp_path / "tqinfer" / "kernels" / "decode_attention.py").read_text()
    assert merge.count("_tnow(b)") == 9 and "TRACE['split']" in merge and "TRACE['query']" in merge


def test_trace_statistics():
    """_stats / per_sm on made-up stamps (ns): two split programs on SM 3, a hot chunk on SM 3, a split on SM 5,
    an empty split; the query from 1000 to 3000 ns, the merge waiting until 9000."""
    mod = _tool()
    #       start  wait   loop   end   kind sm tiles (unused)
    split = [[1800, 3200, 6200, 7000, 0, 3, 4, 0], [1800, 3200, 5200, 6000, 0, 3, 4, 0],
             [2000, 3400, 7400, 8400, 0, 5, 4, 0], [1900, 0, 0, 2100, 2, 5, 0, 0],
             [1700, 3100, 0, 4100, 1, 3, 0, 0]]
    query = [[1000, 0, 0, 3000, 0, 0, 0, 0], [1200, 0, 0, 2800, 0, 0, 0, 0]]
    merge = [[2500, 9000, 10500, 13000, 10700, 11700, 12200, 0]]
    st = mod._stats(query, split, merge)
    assert st["query end"] == 2.0 and st["split programs"] == 3 and st["hot programs"] == 1
    assert st["split after wait"] == 2.2 and st["tile loop (median)"] == 3.0 and st["tile loop (max)"] == 4.0
    assert st["split end (max)"] == 7.4 and st["merge after wait"] == 8.0 and st["merge end"] == 12.0
    assert st["hot end (max)"] == 3.1 and st["tiles a split (max)"] == 4
    assert mod.per_sm(split, query) == {(1, 0): (1, 7.4, 7.4), (2, 1): (1, 6.0, 6.0)}
    with pytest.raises(SystemExit):  # the Gluon split kernel did not run: nothing stamped
        mod._stats(query, [], merge)
