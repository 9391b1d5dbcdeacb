"""Chain mode: drafting inside transformers' own assisted-decoding loop.

`SpecVLMChainCandidateGenerator` is a `CandidateGenerator` with `requires_model_outputs=True`: after every
target forward it receives the target's outputs (with the hidden states the draft needs) and the number of
accepted candidates. It keeps the draft's KV cache exactly at the verified prefix: the rows it drafted with
its own predicted features are cropped, and the verified tokens are consumed with the target's true features.

Sampling: each drafted token is drawn from softmax(processed draft logits), and exactly those processed logits
are returned, so transformers' speculative sampling compares the target against the distribution the draft
really sampled from. With a reduced draft vocabulary the returned logits are -inf outside it (q = 0 there).
"""

from __future__ import annotations

import time

import torch
from transformers.cache_utils import DynamicCache
from transformers.generation.candidate_generator import CandidateGenerator
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList

from .. import hf_private
from ..backends import draft_logits, draft_step
from ..targets import families as targets
from ..targets import features as target_features
from .budget import (
    AUTO_CHAIN_CUMULATIVE,
    AUTO_CHAIN_TOKENS,
    CHAIN_BACKOFF_ACCEPTED,
    BudgetPlanner,
    budget_state,
    chain_backoff,
)
from .prefill import draft_prefill, draft_prompt_ids, feed_draft, uncached_length
from .settings import GenerationStats, refuse_inexact_processors
from .tree import room


class SpecVLMChainCandidateGenerator(CandidateGenerator):
    """transformers' candidate-generator contract: `requires_model_outputs`, `model_kwargs_overrides` (the hidden
    states the draft reads), `num_drafting_tokens`, `get_candidates`, `update_candidate_strategy`; everything the
    installed release's assisted loop reads is checked at `bind` (`hf_private.assisted_loop_reads`)."""

    requires_model_outputs = True
    model_kwargs_overrides: dict | None = None  # set per call in __init__

    def __init__(self, target, draft, generation_config, logits_processor, model_kwargs):
        self.target = target
        self.draft = draft
        self.settings = draft._active_settings or draft.decoding_settings(decoding_mode="chain")
        self.model_kwargs_overrides = {
            "output_hidden_states": target_features.hidden_state_request(draft.config.target_layers)
        }
        self.logits_processor = logits_processor
        # drafting stops at a token that ends generation, so a stop can only fall on a chunk's last token
        self.stopping_criteria = getattr(draft, "_active_stopping_criteria", None)
        self.do_sample = bool(generation_config.do_sample)
        self.max_length = generation_config.max_length
        self.cache = DynamicCache()
        self.row_position = 0  # draft position of the next context row
        self.context_len = 0  # draft cache rows holding the verified context
        self.prefilled = False
        self.prompt_len = None
        self._capture = None
        self._captured: list[torch.Tensor] = []
        self._prefill_inputs = None  # what the draft's prefill needs, until it runs (`_prefill_draft`)
        # automatic chains back off to plain steps when drafts are not accepted (`_back_off`); the tokens of those
        # steps wait here, with their target features, until the draft consumes them
        self.pending_tokens: list[torch.Tensor] = []
        self.pending_feats: list[torch.Tensor] = []
        self.last_was_spec, self.last_drafted = False, 0
        self.backoff = chain_backoff(draft, target, target.device)
        self.stats = GenerationStats(decoding_mode="chain")
        self.stats.target_forwards = 0
        self._start = time.perf_counter()
        self._layout_kwargs = getattr(draft, "_layout_kwargs", {})
        draft.last_generation_stats = self.stats

    @torch.no_grad()
    def get_candidates(
        self,
        input_ids,
        model_kwargs=None,
        model_outputs=None,
        is_first_iteration=False,
        n_last_matches=0,
        **kwargs,
    ):
        stats = self.stats
        if is_first_iteration:
            # Let the target prefill first: the draft needs its features of the whole prompt.
            self.prompt_len = input_ids.shape[1]
            self._capture = hf_private.record_decoder_inputs(self.target, self._captured, once=True)
            return input_ids, None
        stats.target_forwards += 1  # the forward whose outputs we just received
        draft = self.draft
        t0 = time.perf_counter()
        feats = target_features.select_features(model_outputs.hidden_states, draft.config.target_layers)
        if not self.prefilled:
            self.prefilled = True
            # first call after the prefill: input_ids = prompt + first token; the prefill ran the prompt tokens after
            # any reused cache (multi-turn), and the draft's context is those
            embeds = self._captured.pop()
            n_prefilled = embeds.shape[1]
            prompt_ids = draft_prompt_ids(input_ids[:, : self.prompt_len], n_prefilled)
            spans = targets.visual_spans(
                targets.unwrap_target(self.target), prompt_ids, {**model_kwargs, **self._layout_kwargs}
            )
            # the draft's own prefill waits for the first speculative step: a call that stays backed off (a draft
            # that did not pay in earlier calls) never pays it
            self._prefill_inputs = (
                prompt_ids,
                embeds,
                feats[:, :n_prefilled],
                input_ids[:, self.prompt_len :],
                spans,
            )
            self.row_position = n_prefilled
            stats.new_tokens = 1
            # (the draft's share of them is set by its prefill)
            stats.visual_tokens = sum(span.length for span in spans)
            # no room to draft (max_length), or still backed off from earlier calls: a plain step
            if self._room(input_ids) <= 0 or self._back_off(0):
                stats.budget_steps.append(("plain", 0))
                return input_ids, None
            hidden = self._prefill_draft()
            t0 = time.perf_counter()
        else:
            # the target verified n_last_matches candidates and added one token: consume them with true features
            stats.accepted_lengths.append(n_last_matches + 1)
            stats.new_tokens += n_last_matches + 1
            self.cache.crop(-(self.cache.get_seq_length() - self.context_len))
            m = n_last_matches + 1
            self.pending_tokens.append(input_ids[0, -m:])
            self.pending_feats.append(feats[0, :m])
            # a plain step (no room to draft, or backing off): no drafting, the draft catches up later
            if self._room(input_ids) <= 0 or self._back_off(n_last_matches):
                stats.draft_time_s += time.perf_counter() - t0
                stats.budget_steps.append(("plain", 0))
                return input_ids, None
            if self._prefill_inputs is not None:
                self._prefill_draft()
                t0 = time.perf_counter()
            tokens, rows = torch.cat(self.pending_tokens), torch.cat(self.pending_feats)
            self.pending_tokens, self.pending_feats = [], []
            hidden = feed_draft(draft, self.cache, tokens, rows, self.row_position)
            self.row_position += tokens.shape[0]
        self.context_len = self.cache.get_seq_length()

        # draft a chain
        length, threshold = self.settings.num_draft_tokens, self.settings.draft_confidence_threshold
        cumulative_cut = None
        if (
            length is None
        ):  # automatic: a long chain cut where its cumulative probability stops paying (budget.py)
            state = budget_state(draft, self.target, input_ids.device)
            length = min(AUTO_CHAIN_TOKENS, self.backoff.reach)
            cumulative_cut = BudgetPlanner(state).chain_cut() if state is not None else AUTO_CHAIN_CUMULATIVE
        budget = min(length, self._room(input_ids))
        drafted, drafted_logits = [], []
        seq = input_ids
        position = self.row_position
        cumulative = 1.0
        # the draft's confidence is read on the host only where a cut-off uses it (each read waits for the device)
        read_confidence = threshold > 0 or cumulative_cut is not None
        for step in range(budget):  # (>= 1: a step without room is a plain one above)
            token, logits, top_prob = self._draft_token(seq, hidden[:, -1])
            if read_confidence:
                top = float(top_prob)
                if step > 0 and threshold > 0 and top < threshold:
                    break
                cumulative *= top
                if step > 0 and cumulative_cut is not None and cumulative < cumulative_cut:
                    break
            drafted.append(token)
            drafted_logits.append(logits)
            seq = torch.cat([seq, token], dim=1)
            if step == budget - 1:
                break
            if self.stopping_criteria is not None and bool(self.stopping_criteria(seq, None).any()):
                break
            hidden = draft_step(
                draft,
                token[0],
                hidden[0],
                position_ids=torch.tensor([[position]], device=seq.device),
                max_position=position,
                past_key_values=self.cache,
            )[None]
            position += 1
        stats.draft_time_s += time.perf_counter() - t0
        stats.total_time_s = time.perf_counter() - self._start
        self.last_was_spec, self.last_drafted = bool(drafted), len(drafted)
        stats.budget_steps.append(("spec" if drafted else "plain", len(drafted)))
        if not drafted:
            return input_ids, None
        return seq, torch.stack(drafted_logits, dim=1)  # (1, n, V)

    @property
    def num_drafting_tokens(self) -> int:
        """The most candidates one `get_candidates` call returns (transformers >= 5.25 sizes the cache's
        past recording from it: a hybrid target's recurrent states are kept for that many steps, and one
        verify step may reject all of them)."""
        if self.settings.num_draft_tokens is not None:
            return self.settings.num_draft_tokens
        return AUTO_CHAIN_TOKENS

    def _room(self, input_ids: torch.Tensor) -> int:
        """Draft tokens `max_length` leaves room for before the target's own next token (`tree.room`)."""
        return room(self.max_length, input_ids.shape[1])

    def _prefill_draft(self) -> torch.Tensor:
        """The draft over the prompt's features and the first token (`draft_prefill`); returns its last output."""
        start = time.perf_counter()
        prompt_ids, embeds, feats, first_tokens, spans = self._prefill_inputs
        self._prefill_inputs = None
        hidden = draft_prefill(
            self.draft, prompt_ids, embeds, feats, first_tokens, spans, self.cache, self.stats
        )
        self.stats.draft_prefill_time_s += time.perf_counter() - start
        return hidden

    def _back_off(self, accepted: int) -> bool:
        """Automatic chains (no `num_draft_tokens`): after speculative steps that accept almost nothing (an untrained
        or mismatched draft), run 4, 8, ... up to 64 plain steps without drafting before probing again."""
        if not self.settings.auto_chain:
            return False
        if self.last_was_spec:
            backoff = self.backoff
            # a whole chain of the longest length accepted: reach further
            if accepted >= self.last_drafted >= backoff.reach:
                backoff.reach = min(2 * backoff.reach, AUTO_CHAIN_TOKENS)
            backoff.accepted_ema = 0.5 * backoff.accepted_ema + 0.5 * accepted
            if backoff.accepted_ema < CHAIN_BACKOFF_ACCEPTED:
                backoff.start()
                # the probe after the back-off: one more probe accepting nothing backs off again (0.5 -> 0.25),
                # one accepting a token keeps speculating (was 1.0: two failed probes per back-off)
                backoff.accepted_ema = 0.5
            elif accepted >= 1:
                backoff.paid()
        self.last_was_spec = False
        return self.backoff.take()

    def _draft_token(
        self, seq: torch.Tensor, hidden: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One drafted token from the draft output `hidden` (1, h) after `seq` (1, L).

        Returns (token (1, 1), full-vocabulary processed logits (1, V), top probability (scalar tensor)). The token is drawn from
        exactly q = softmax(returned logits); with a reduced draft vocabulary q is 0 outside it (-inf logits).
        """
        draft = self.draft
        logits, ids = draft_logits(draft, hidden)  # (1, Vd), ids (Vd,) or None (full vocabulary)
        logits = logits.float()
        if ids is not None and len(self.logits_processor) == 0:
            # q restricted to the draft vocabulary: softmax over Vd columns equals softmax of the scattered logits
            probs = torch.softmax(logits, dim=-1)
            column = torch.multinomial(probs, 1) if self.do_sample else probs.argmax(-1, keepdim=True)
            return ids[column], draft.full_vocab_logits(logits, ids), probs.max()
        if ids is not None:
            logits = draft.full_vocab_logits(logits, ids)  # (1, V): processors see the target's vocabulary
        if len(self.logits_processor) > 0:
            logits = self.logits_processor(seq, logits)
        probs = torch.softmax(logits, dim=-1)  # q: the distribution the token is drawn from
        token = torch.multinomial(probs, 1) if self.do_sample else probs.argmax(-1, keepdim=True)
        return token, logits, probs.max()

    def update_candidate_strategy(self, input_ids, scores, num_matches):
        self.stats.total_time_s = time.perf_counter() - self._start


class _StopAtAnyNewToken(StoppingCriteria):
    """Stock assisted decoding checks stopping criteria once per chunk, at its end; plain generate checks after
    every token. This checks every position added since the last call, so the loop ends on the chunk holding
    the stop; the caller then cuts the chunk where plain generate would have stopped."""

    def __init__(self, criteria: StoppingCriteriaList, checked_len: int):
        self.criteria, self.checked_len = criteria, checked_len

    def __call__(self, input_ids, scores, **kwargs):
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for end in range(self.checked_len + 1, input_ids.shape[1] + 1):
            done |= self.criteria(input_ids[:, :end], scores)
            if bool(done.all()):
                break
        self.checked_len = input_ids.shape[1]
        return done


def first_stop(criteria: StoppingCriteriaList, sequence: torch.Tensor, start: int) -> int:
    """Length at which plain generate would have stopped, scanning positions after `start`."""
    for end in range(start + 1, sequence.shape[1] + 1):
        if bool(criteria(sequence[:, :end], None).any()):
            return end
    return sequence.shape[1]


class _ExactStreamer:
    """Forwards chunks to the user's streamer, cut at the first token where plain generate would stop."""

    def __init__(self, streamer, criteria: StoppingCriteriaList, input_ids: torch.Tensor):
        self.streamer, self.criteria, self.sequence, self.stopped = streamer, criteria, input_ids, False

    def put(self, value):
        if self.stopped:
            return
        start = self.sequence.shape[1]
        self.sequence = torch.cat([self.sequence, value.to(self.sequence.device).view(1, -1)], dim=1)
        end = first_stop(self.criteria, self.sequence, start)
        self.stopped = end < self.sequence.shape[1] or bool(self.criteria(self.sequence[:, :end], None).any())
        self.sequence = self.sequence[:, :end]
        self.streamer.put(value.view(-1)[: end - start])

    def end(self):
        self.streamer.end()


def chain_decoding(
    model,
    input_ids,
    logits_processor,
    stopping_criteria,
    generation_config,
    *,
    assistant_model,
    settings,
    streamer=None,
    **kwargs,
):
    """Chain mode: transformers' own assisted-decoding loop with our candidate generator."""
    draft = assistant_model
    refuse_inexact_processors(generation_config)
    kwargs.pop("assistant_model", None)
    kwargs.pop("streamer", None)
    draft._active_settings = settings
    draft._active_stopping_criteria = stopping_criteria
    start = time.perf_counter()
    prompt_len = input_ids.shape[1]
    loop_criteria = StoppingCriteriaList([_StopAtAnyNewToken(stopping_criteria, prompt_len)])
    if streamer is not None:
        streamer = _ExactStreamer(streamer, stopping_criteria, input_ids)
    # stock assisted decoding's first forward runs the whole prompt even on a reused cache (multi-turn), where plain
    # generate's prefill runs only the uncached tokens: make it do the same, for this call only
    restore_prefill = hf_private.prefill_only_uncached(model, uncached_length(input_ids, kwargs))
    try:
        result = hf_private.assisted_decoding(
            model,
            input_ids,
            logits_processor=logits_processor,
            stopping_criteria=loop_criteria,
            generation_config=generation_config,
            assistant_model=draft,
            streamer=streamer,
            **kwargs,
        )
    finally:
        restore_prefill()
        draft._active_settings = None
        draft._active_stopping_criteria = None
    sequences = result if isinstance(result, torch.Tensor) else result.sequences
    sequences = sequences[:, : first_stop(stopping_criteria, sequences, prompt_len)]
    if isinstance(result, torch.Tensor):
        result = sequences
    else:
        result.sequences = sequences
    _finish_chain_stats(draft.last_generation_stats, sequences.shape[1] - prompt_len)
    draft.last_generation_stats.total_time_s = time.perf_counter() - start
    return result


def _finish_chain_stats(stats, total_new: int) -> None:
    """The candidate generator sees every verify forward but the last one; account for it here."""
    if stats.target_forwards == 0:  # generation ended with the prefill's token
        stats.target_forwards, stats.new_tokens = 1, total_new
        return
    missing = total_new - stats.new_tokens
    if missing > 0:
        stats.accepted_lengths.append(missing)
        stats.new_tokens = total_new
        stats.target_forwards += 1
