"""The one attention entry point model code calls; the step's cache decides how it is computed."""

from __future__ import annotations

import torch

from tqinfer.engine.context import get_context


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, scale: float,
              window: int | None = None) -> torch.Tensor:
    """q [T, Hq, d], k/v [T, H, d] of the step's new tokens -> [T, Hq, d].

    Each chunk attends causally to itself and to its sequence's cached prefix; the cache then
    stores the chunk's k/v. `window` is a sliding-window layer's span (None: full attention)."""
    ctx = get_context()
    return ctx.cache.attend(layer, q, k, v, ctx, scale, window)
