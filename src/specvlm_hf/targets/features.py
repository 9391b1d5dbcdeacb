"""Reading what the draft needs out of one ordinary target forward.

The draft consumes, for every position the target processes:
  * the target's features `f_t`: the hidden states named by `config.target_layers` (index -1 is the last
    hidden state after the final norm, i.e. the input of `lm_head`), concatenated on the last dim;
  * the embedding the target itself used at that position (`inputs_embeds` as its text decoder received
    them). At visual placeholders this is the projected image/video feature, so the draft sees the image
    without re-encoding it, for every family, through one forward pre-hook on the text decoder.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .. import hf_private


def hidden_state_request(target_layers: list[int]) -> list[int]:
    """The `output_hidden_states` value that asks the target for exactly these layers."""
    return sorted(set(target_layers))


def select_features(hidden_states, target_layers: list[int]) -> torch.Tensor:
    """Concatenate the requested hidden states: tuple of (B, T, h) -> (B, T, n*h)."""
    parts = [hidden_states[i] for i in target_layers]
    if any(p is None for p in parts):
        raise RuntimeError(f"The target did not return hidden states for layers {target_layers}.")
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


@contextmanager
def capture_decoder_inputs(target):
    """Record the `inputs_embeds` the target's text decoder receives during forwards inside the block.

    Yields a list; each forward appends its (B, T, h) inputs_embeds.
    """
    captured: list[torch.Tensor] = []
    handle = hf_private.record_decoder_inputs(target, captured)
    try:
        yield captured
    finally:
        handle.remove()
