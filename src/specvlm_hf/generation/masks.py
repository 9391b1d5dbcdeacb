"""Attention masks of the decoding loops: the target's verify forward over draft trees on top of its cache."""

from __future__ import annotations

import torch


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean "may attend" mask -> additive float mask (0 where allowed, the dtype's minimum elsewhere)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


def verify_mask(
    cache,
    ancestors: torch.Tensor,
    depths: torch.Tensor,
    layer_types,
    dtype: torch.dtype,
    cache_valid: torch.Tensor | None = None,
):
    """Attention mask for verifying trees of n nodes on top of `cache`, as the target's forward expects it.

    ancestors: (n, n) bool for one sequence, or (B, n, n) one tree per sequence of a batch ([i, j]: node j is i or
    an ancestor of i); depths: (n,) / (B, n), 0 for the root. cache_valid: (B, P) bool over the P cached positions,
    False on padding and holes a sequence must not see (None: all visible).
    Full-attention layers see the whole prefix; sliding-window layers (Gemma 3) see the prefix keys they hold,
    minus those that fall out of each node's window. Returns a (B, 1, n, kv) tensor, or a dict keyed by layer
    type when the target mixes both kinds.
    """
    if ancestors.dim() == 2:
        ancestors, depths = ancestors[None], depths[None]
    bsz, n, _ = ancestors.shape
    device = ancestors.device
    past = cache.get_seq_length()
    full = torch.ones(bsz, n, past + n, dtype=torch.bool, device=device)
    if cache_valid is not None:
        full[:, :, :past] = cache_valid[:, None, -past:] if past else full[:, :, :0]
    full[:, :, past:] = ancestors
    sliding_layers = [layer for layer in cache.layers if getattr(layer, "sliding_window", None)]
    if not sliding_layers or layer_types is None:
        return additive_mask(full, dtype)[:, None]
    layer = sliding_layers[0]
    window = layer.sliding_window
    held = min(
        layer.keys.shape[2] if layer.keys is not None else 0, window - 1
    )  # prefix keys the layer returns
    # prefix key j sits `held - j` tokens before the root; node i is depths[i] tokens after it
    distance = (held - torch.arange(held, device=device))[None, None, :] + depths[:, :, None]
    sliding = torch.ones(bsz, n, held + n, dtype=torch.bool, device=device)
    sliding[:, :, :held] = distance < window
    if cache_valid is not None and held:
        sliding[:, :, :held] &= cache_valid[:, None, -held:]
    sliding[:, :, held:] = ancestors
    return {
        "full_attention": additive_mask(full, dtype)[:, None],
        "sliding_attention": additive_mask(sliding, dtype)[:, None],
    }
