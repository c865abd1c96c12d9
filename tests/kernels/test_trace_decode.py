"""scripts/trace_decode.py patches a copy of the kernels with timer stamps by exact text: every patch must
still apply to the current sources (each text found once) and the patched modules must parse, so that
the GPU timeline tool does not silently drift from the kernels it instruments."""

import ast
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_trace_patches_apply_and_parse(tmp_path):
    spec = importlib.util.spec_from_file_location("trace_decode", os.path.join(ROOT, "scripts", "trace_decode.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.instrument(str(tmp_path))
    for rel, patches in mod.PATCHES.items():
        src = (tmp_path / "tqinfer" / rel).read_text()
        ast.parse(src)
        assert all(new in src for _, new in patches)
    gluon = (tmp_path / "tqinfer" / "kernels" / "decode_gluon.py").read_text()
    assert gluon.count("_now(b)") == 8 and "%smid" in gluon
    merge = (tmp_path / "tqinfer" / "kernels" / "decode_attention.py").read_text()
    assert merge.count("_tnow(b)") == 9 and "TRACE['split']" in merge
