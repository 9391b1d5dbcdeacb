"""A draft that proposes the target's own greedy continuation, except at chosen positions.

Test-support module. The draft still runs its real layers (so its KV cache behaves exactly as in use), but
its outputs carry their RoPE position in channel 0, and `compute_logits` turns that position into a point
mass on the reference token there: row t (position t) pairs f_t with x_{t+1} and predicts x_{t+2}. At a
"wrong" position it proposes another token and gives the true one -inf, so no tree can contain it there.
"""

from __future__ import annotations

import torch

from specvlm_hf import SpecVLMDraftConfig, SpecVLMDraftModel


class ForcedDraft(SpecVLMDraftModel):
    def force(self, reference: torch.Tensor, wrong_positions: set[int]) -> ForcedDraft:
        """reference: (L,) the full greedy sequence (prompt + continuation); wrong_positions: absolute indices."""
        self.reference = reference.tolist()
        self.wrong = set(wrong_positions)
        return self

    def reference_token(self, index: int) -> int | None:
        """The token the reference has at position `index`, or None past its end."""
        return self.reference[index] if index < len(self.reference) else None

    def decode_rows(
        self, fused, position_ids=None, attention_mask=None, past_key_values=None, max_position=None
    ):
        # every draft forward of the decoding loops (prefill, tree levels, chain steps) comes through here
        if position_ids is None:
            raise AssertionError("decoding must always pass explicit draft positions")
        if max_position is not None and max_position != int(position_ids.max()):
            raise AssertionError(f"max_position {max_position} but positions reach {int(position_ids.max())}")
        hidden = (
            super().decode_rows(fused, position_ids, attention_mask, past_key_values, max_position).clone()
        )
        hidden[..., 0] = position_ids.to(hidden.dtype)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        vocab = self.config.vocab_size
        target_index = hidden[..., 0].round().long() + 2  # row t predicts x_{t+2}
        flat = target_index.reshape(-1).tolist()
        logits = torch.zeros(len(flat), vocab)
        for row, index in enumerate(flat):
            true = self.reference_token(index)
            if true is None:  # past the reference: a uniform (all-zero) row
                continue
            if index in self.wrong:
                logits[row, (true + 1) % vocab] = 30.0
                logits[row, true] = float("-inf")
            else:
                logits[row, true] = 30.0
        return logits.reshape(*target_index.shape, vocab).to(hidden.device)


def make_forced_draft(target, reference, wrong_positions=(), **config_overrides) -> ForcedDraft:
    # a fixed tree budget (the paper's unless overridden): these tests check acceptance mechanics, which the
    # automatic budget would change with the machine's timing (`tree_top_k=None` asks for it)
    config_overrides = {"tree_top_k": 10, **config_overrides}
    config = SpecVLMDraftConfig.from_target(target, **config_overrides)
    return ForcedDraft(config).bind(target).force(reference, set(wrong_positions))


def expected_accepted_lengths(prompt_len: int, n_new: int, wrong_positions, lookahead: int) -> list[int]:
    """Tokens emitted per verify forward when the draft proposes up to `lookahead` tokens ahead of the root."""
    lengths, generated = [], 1  # the prefill emits the first token
    wrong = sorted(w - prompt_len for w in wrong_positions)  # indices into the continuation
    while generated < n_new:
        root = generated - 1
        accepted = 0
        while accepted < lookahead and (root + accepted + 1) not in wrong:
            accepted += 1
        emitted = min(accepted + 1, n_new - generated)
        lengths.append(emitted)
        generated += emitted
    return lengths


class BatchedForcedDraft(ForcedDraft):
    """A ForcedDraft for a batch: the reference is a dict position -> token merged over the rows.

    Positions are a row's real-token positions (left padding does not count). Rows whose decoding position ranges
    are disjoint each get their own continuation proposed; a position with no entry gives a uniform (all-zero)
    row of logits, as the batch-1 draft does past the end of its reference."""

    def force_positions(self, reference: dict[int, int], wrong_positions: set[int]) -> BatchedForcedDraft:
        self.reference_at = dict(reference)
        self.wrong = set(wrong_positions)
        return self

    def reference_token(self, index: int) -> int | None:
        return self.reference_at.get(index)


def merged_reference(rows: list[list[int]], starts: list[int]) -> dict[int, int]:
    """position -> token over every row's continuation: row b's tokens sit at starts[b], starts[b] + 1, ...

    Raises if two rows put different tokens at one position (their decoding ranges overlap)."""
    merged: dict[int, int] = {}
    for tokens, start in zip(rows, starts):
        for offset, token in enumerate(tokens):
            position = start + offset
            if merged.setdefault(position, token) != token:
                raise ValueError(f"rows overlap at position {position}: choose prompt lengths further apart")
    return merged


def make_batched_forced_draft(
    target, reference: dict[int, int], wrong_positions=(), **config_overrides
) -> BatchedForcedDraft:
    """`make_forced_draft` for a batch (`merged_reference` builds `reference`); a fixed tree budget unless
    `tree_top_k=None` is passed (then the automatic one)."""
    config_overrides = {"tree_top_k": 10, **config_overrides}
    config = SpecVLMDraftConfig.from_target(target, **config_overrides)
    return BatchedForcedDraft(config).bind(target).force_positions(reference, set(wrong_positions))
