"""Chain drafting inside transformers' own assisted-decoding loop.

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

from . import target_features, targets
from .decoding import GenerationStats, draft_logits, draft_prefill, draft_prompt_ids, draft_step


class SpecVLMChainCandidateGenerator(CandidateGenerator):
    requires_model_outputs = True

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
            self._capture = target_features.record_decoder_inputs(self.target, self._captured, once=True)
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
            hidden = draft_prefill(
                draft,
                prompt_ids,
                embeds,
                feats[:, :n_prefilled],
                input_ids[:, self.prompt_len :],
                spans,
                self.cache,
                stats,
            )
            self.row_position = n_prefilled
            stats.new_tokens = 1
            t1 = time.perf_counter()
            stats.draft_prefill_time_s += t1 - t0
            t0 = t1
        else:
            # the target verified n_last_matches candidates and added one token: consume them with true features
            stats.accepted_lengths.append(n_last_matches + 1)
            stats.new_tokens += n_last_matches + 1
            self.cache.crop(-(self.cache.get_seq_length() - self.context_len))
            m = n_last_matches + 1
            new_tokens = input_ids[:, -m:]
            positions = torch.arange(self.row_position, self.row_position + m, device=input_ids.device)[None]
            hidden = draft_step(
                draft,
                new_tokens[0],
                feats[0, :m],
                position_ids=positions,
                max_position=self.row_position + m - 1,
                past_key_values=self.cache,
            )[None, -1:]
            self.row_position += m
        self.context_len = self.cache.get_seq_length()

        # draft a chain
        budget = min(self.settings.num_draft_tokens, self.max_length - input_ids.shape[1] - 1)
        drafted, drafted_logits = [], []
        seq = input_ids
        position = self.row_position
        for step in range(max(budget, 0)):
            token, logits, top_prob = self._draft_token(seq, hidden[:, -1])
            threshold = self.settings.draft_confidence_threshold
            if step > 0 and threshold > 0 and float(top_prob) < threshold:
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
        if not drafted:
            return input_ids, None
        return seq, torch.stack(drafted_logits, dim=1)  # (1, n, V)

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
