"""The split and hot-token bounds of a decode step, computed on the device from the prefix length: plain
scalar Triton, shared by decode_attention's split and merge kernels and decode_gluon's split kernel (a
Gluon kernel calls them as it calls its own helpers)."""

import triton
import triton.language as tl


@triton.jit
def split_bounds(L, sinks, window, BLOCK_N: tl.constexpr, NSPLIT, MIN_TILES: tl.constexpr, FILL,
                 WAVE_TILES: tl.constexpr, SPREAD=1):
    """For a prefix of L tokens: the end of the compressed tokens, the first tile, the tile bound, tiles
    per split and the number of splits with work (the first n_act <= NSPLIT; the rest are empty). A
    split takes at least min(MIN_TILES, max(1, tiles / SPREAD)) tiles (rounded up): MIN_TILES, or fewer
    where SPREAD splits of fewer cover the tiles (SPREAD: the splits of a sequence that one program a
    multiprocessor allows, so that short contexts spread over the idle ones; 1: MIN_TILES, or all the
    tiles where there are fewer), and, with WAVE_TILES > 0, at least min(WAVE_TILES, tiles / FILL): FILL
    splits a sequence while that fills one wave of the GPU, more splits of WAVE_TILES tiles (up to NSPLIT)
    past it. WAVE_TILES 0: the even split over NSPLIT (FILL unused)."""
    c_end = tl.where(window > 0, L - window, L)
    lo = sinks // BLOCK_N
    hi = tl.where(c_end > sinks, (c_end + BLOCK_N - 1) // BLOCK_N, lo)
    floor = tl.minimum(tl.maximum((hi - lo + SPREAD - 1) // SPREAD, 1), MIN_TILES)
    per = tl.maximum((hi - lo + NSPLIT - 1) // NSPLIT, floor)
    if WAVE_TILES > 0:
        per = tl.maximum(per, tl.minimum((hi - lo + FILL - 1) // FILL, WAVE_TILES))
    n_act = (hi - lo + per - 1) // per
    return c_end, lo, hi, per, n_act


@triton.jit
def hot_count(L, sinks, window):
    """(tokens kept hot for a prefix of L: the sinks, then the recent window; sinks held, window start)."""
    n_sink = tl.minimum(sinks, L)
    w_lo = tl.where(window > 0, tl.maximum(sinks, L - window), L)
    return n_sink + tl.maximum(L - w_lo, 0), n_sink, w_lo


@triton.jit
def hot_slot(i, n_sink, w_lo, sinks, window):
    """Ring slot of hot token i (in order: the sinks, then the recent window, whose ring follows them)."""
    t = tl.where(i < n_sink, i, w_lo + i - n_sink)
    return tl.where(i < n_sink, i, sinks + (t - sinks) % tl.maximum(window, 1))
