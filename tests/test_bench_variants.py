"""scripts/bench_decode_variants.py's `applied`: a variant's attributes are set for its calls only (nested
"module.name" keys included), restored even when the call fails, and an unknown name is an error rather
than an unmeasured variant."""

import importlib.util
import os
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _applied():
    spec = importlib.util.spec_from_file_location("bench_decode_variants",
                                                  os.path.join(ROOT, "scripts", "bench_decode_variants.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.applied


def test_variant_attributes_set_and_restored():
    applied = _applied()
    sub = types.ModuleType("decode_gluon")
    sub.HOT_TOKENS = 16
    mod = types.ModuleType("decode_attention")
    mod.SPLIT_MIN_TOKENS, mod.decode_gluon = 256, sub
    with applied(mod, {"SPLIT_MIN_TOKENS": 128, "decode_gluon.HOT_TOKENS": 32}):
        assert (mod.SPLIT_MIN_TOKENS, sub.HOT_TOKENS) == (128, 32)
    assert (mod.SPLIT_MIN_TOKENS, sub.HOT_TOKENS) == (256, 16)
    with pytest.raises(RuntimeError), applied(mod, {"SPLIT_MIN_TOKENS": 64}):
        raise RuntimeError("a failing call")
    assert mod.SPLIT_MIN_TOKENS == 256
    with pytest.raises(ValueError, match="SPLIT_MIN_TOKEN"):
        with applied(mod, {"SPLIT_MIN_TOKEN": 64}):  # a typo
            pass
    assert not hasattr(mod, "SPLIT_MIN_TOKEN")
