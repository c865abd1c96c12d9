"""Helpers shared by the cache tests: tiny model args and float64 attention."""

from __future__ import annotations

from types import SimpleNamespace

import torch


def tiny_args(layers=2, kv_heads=2, head_dim=64):
    return SimpleNamespace(num_hidden_layers=layers, num_key_value_heads=kv_heads, head_dim=head_dim)


def oracle(q, keys, values, qpos, scale):
    """float64 causal attention; q [n, Hq, d], keys/values [L, H, d] (effective, per position)."""
    q, keys, values = q.double(), keys.double(), values.double()
    G = q.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(G, 1), values.repeat_interleave(G, 1)
    s = torch.einsum("nhd,lhd->hnl", q, keys) * scale
    mask = torch.arange(keys.shape[0])[None, :] <= qpos[:, None]
    s = s.masked_fill(~mask[None], float("-inf"))
    return torch.einsum("hnl,lhd->nhd", torch.softmax(s, -1), values)
