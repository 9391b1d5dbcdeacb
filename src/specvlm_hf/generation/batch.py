"""Speculative decoding for a batch of prompts: `vlm.generate(**batch, assistant_model=draft)` with B > 1.

The batch-1 loop (`tree.tree_decoding`) extended to B left-padded sequences, in both decoding modes (chain mode is a
tree with one child per node: transformers' assisted loop, which chain mode drives for one sequence, runs one
sequence only). One step:

1. Draft: every sequence grows its own tree (`tree_policy.build_trees` / `build_sampled_trees`), every tree level of
   every sequence in one draft forward.
2. Verify: the trees, padded to the largest (a padding node sees only itself and is never accepted), go through the
   target in ONE forward with a (B, 1, n, past + n) mask: each node sees its sequence's valid cache positions, its
   ancestors and itself, at per-sequence positions.
3. Accept per sequence (the acceptance walks of `tree.py`, on the host: no model runs there); append and check the
   stopping criteria exactly as plain batched generate does for that row.
4. Compact: sequences accept different lengths. `hf_private.realign_cache` keeps every sequence's prefix and
   accepted path and right-aligns the sequences again (the shorter ones get filler positions on the left, masked
   like padding), so the cache stays one rectangle whose holes only ever sit on the left -- a left-padded batch,
   which sliding-window layers read exactly as plain generate does. Finished sequences leave the batch (their cache
   rows too): a finished sequence costs no more drafting or verifying. The draft consumes each sequence's accepted
   tokens with the target's features in one forward (shorter sequences padded on the left of the chunk, masked).

Rows end as plain batched generate ends them: with an EOS criterion a finished row is filled with the pad token;
without one (only stop strings or lengths), plain generate keeps extending rows that stopped until every row has
stopped, and so does this loop, so every row holds exactly the tokens plain generate would give it.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import DynamicCache
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .. import hf_private
from ..targets import families as targets
from ..targets import features as target_features
from .acceptance import Selector, accept_greedy, accept_sampled
from .budget import BudgetPlanner, planner_for
from .clock import StepClock
from .masks import additive_mask, verify_mask
from .prefill import batch_visual_spans, feed_rows, last_prompt_positions, target_prefill
from .settings import DecodingSettings, GenerationStats, Timer
from .tree import decode_extras, length_cap, refuse_unsupported, room, stop_tokens
from .tree_policy import DraftTree, build_sampled_trees, build_trees

if TYPE_CHECKING:
    from ..draft.modeling_specvlm import SpecVLMDraftModel


class _Rows:
    """The sequences of the batch as plain batched generate would grow them: per row its tokens so far, whether it
    has stopped, and its statistics."""

    def __init__(self, input_ids: torch.Tensor, stopping_criteria, stats: GenerationStats):
        self.ids = [input_ids[b : b + 1] for b in range(input_ids.shape[0])]
        self.criteria = stopping_criteria
        # plain generate fills a finished row with padding only when an EOS criterion exists; otherwise a row that
        # stopped keeps growing until every row has stopped
        self.stops = stop_tokens(stopping_criteria, input_ids.device)
        self.sticky = self.stops is None
        self.stop_len: list[int | None] = [None] * len(self.ids)
        self.stats = stats
        # sticky rows: nothing past the max-length criterion's length is ever output (every row stops there)
        self.cap = length_cap(stopping_criteria)

    def _capped(self, b: int) -> bool:
        return self.cap is not None and self.ids[b].shape[1] >= self.cap

    def append(self, b: int, tokens: list[int]) -> int:
        """Append tokens to row b one at a time, stopping where plain generate would. Returns how many went in."""
        added = 0
        for token in tokens:
            self.ids[b] = torch.cat([self.ids[b], self.ids[b].new_tensor([[token]])], dim=1)
            added += 1
            length = self.ids[b].shape[1]
            if self.stop_len[b] is None:
                if bool(self.criteria(self.ids[b], None).any()):
                    self.stop_len[b] = length
                    if not self.sticky:
                        break
            if (
                self.sticky
                and self.stop_len[b] is not None
                and (self._capped(b) or (self.all_stopped and length >= self.end))
            ):
                break
        return added

    @property
    def all_stopped(self) -> bool:
        return all(n is not None for n in self.stop_len)

    @property
    def end(self) -> int:
        """Sticky rows: the length every row is cut to (where the last row stopped)."""
        return max(self.stop_len)

    def done(self, b: int) -> bool:
        if self.stop_len[b] is None:
            return False
        return not self.sticky or self._capped(b) or (self.all_stopped and self.ids[b].shape[1] >= self.end)

    @property
    def output_length(self) -> int:
        if self.sticky and self.all_stopped:
            return self.end
        return max(ids.shape[1] for ids in self.ids)

    def output(self, pad_id: int) -> torch.Tensor:
        total = self.output_length
        out = self.ids[0].new_full((len(self.ids), total), pad_id)
        for b, ids in enumerate(self.ids):
            n = min(ids.shape[1], total)
            out[b, :n] = ids[0, :n]
        return out


def pad_token_id(generation_config) -> int:
    """The id plain generate fills finished rows with: pad_token_id, else the first EOS id."""
    pad = generation_config.pad_token_id
    if pad is None:
        eos = generation_config.eos_token_id
        pad = eos[0] if isinstance(eos, (list, tuple)) else eos
    if isinstance(pad, torch.Tensor):
        pad = pad.view(-1)[0]
    return int(pad) if pad is not None else 0


def _realign_valid(
    valid: torch.Tensor, rows: torch.Tensor | None, m: int, kept: torch.Tensor
) -> torch.Tensor:
    """The validity mask after `hf_private.realign_cache` with the same rows and kept counts: fillers, the old
    positions, then each row's kept ones."""
    if rows is not None:
        valid = valid.index_select(0, rows)
    extended = torch.cat([valid, valid.new_ones(valid.shape[0], m)], dim=1)
    j = torch.arange(extended.shape[1], device=valid.device)[None] - (m - kept)[:, None]
    return (j >= 0) & extended.gather(1, j.clamp_min(0))


def _pad_trees(trees: list[DraftTree], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens (B, n), depths (B, n) and ancestors (B, n, n) of trees padded to the largest: a padding node carries
    its row's root token, sees only itself and is never walked into (the walks read each tree's own nodes)."""
    n = max(t.tokens.shape[0] for t in trees)
    tokens = torch.stack([torch.cat([t.tokens, t.tokens[:1].expand(n - t.tokens.shape[0])]) for t in trees])
    depths = torch.ones(len(trees), n, dtype=torch.long, device=device)
    ancestors = torch.eye(n, dtype=torch.bool, device=device).repeat(len(trees), 1, 1)
    for b, t in enumerate(trees):
        size = t.tokens.shape[0]
        depths[b, :size] = t.depths
        ancestors[b, :size, :size] = t.ancestors
    return tokens, depths, ancestors


def batch_decoding(
    model,
    input_ids: torch.LongTensor,
    logits_processor,
    stopping_criteria,
    generation_config,
    synced_gpus: bool = False,
    streamer=None,
    assistant_model: SpecVLMDraftModel | None = None,
    *,
    settings: DecodingSettings,
    **model_kwargs,
):
    """The decoding loop run by `vlm.generate(..., assistant_model=draft)` on a batch (a `custom_generate`)."""
    draft = assistant_model
    refuse_unsupported(generation_config, synced_gpus, model_kwargs, batch_size=input_ids.shape[0])
    if streamer is not None:
        raise ValueError(
            f"A streamer takes one sequence, and this generate call has a batch of {input_ids.shape[0]}. "
            "Generate one prompt at a time to stream, or drop the streamer."
        )
    bsz, prompt_len = input_ids.shape
    mode = settings.decoding_mode
    stats = GenerationStats(decoding_mode=mode)
    stats.rows = [GenerationStats(decoding_mode=mode) for _ in range(bsz)]
    draft.last_generation_stats = stats
    start_time = time.perf_counter()
    select = Selector(logits_processor, generation_config.do_sample)
    draft_temperature = (generation_config.temperature or 1.0) if generation_config.do_sample else None
    request = target_features.hidden_state_request(draft.config.target_layers)
    mask = model_kwargs.get("attention_mask")
    valid = (mask if mask is not None else torch.ones_like(input_ids)).bool()  # (B, L): False on left padding
    rows = _Rows(input_ids, stopping_criteria, stats)
    # the planner's times (automatic budget only): synchronized device timing, `clock.py`
    clock = StepClock(
        input_ids.device, enabled=settings.auto_chain if mode == "chain" else settings.auto_tree
    )

    # ---- prefill: the target on the prompts, every row's first token
    with Timer(stats, "prefill_time_s"):
        prefill_marks = [clock.mark()]
        outputs, prompt_embeds, prompt_feats = target_prefill(model, draft, input_ids, model_kwargs)
        prefill_marks.append(clock.mark())
        cache = outputs.cache
        if cache is None:
            raise RuntimeError("SpecVLM speculative decoding needs the target's KV cache (use_cache=True).")
        restore_recording = hf_private.start_past_recording(cache)
        last_pos = last_prompt_positions(model, model_kwargs, valid.sum(dim=1, keepdim=True))  # (..., B, 1)
        selectors = [select.for_row(b, bsz) for b in range(bsz)]
        roots = [selectors[b](rows.ids[b], outputs.logits[b, -1]) for b in range(bsz)]
    stats.target_forwards = 1
    for b in range(bsz):
        rows.append(b, [roots[b]])
        stats.rows[b].target_forwards = 1
    active = [b for b in range(bsz) if not rows.done(b)]

    restore_attention = hf_private.use_mask_attention(model)
    try:
        if active:
            loop = _BatchLoop(
                model,
                draft,
                settings,
                stats,
                rows,
                selectors,
                draft_temperature,
                request,
                model_kwargs,
                clock,
            )
            loop.start(
                cache, active, valid, last_pos, roots, input_ids, prompt_embeds, prompt_feats, prefill_marks
            )
            loop.run()
    finally:
        restore_attention()
        restore_recording()
    for b, row in enumerate(stats.rows):
        row.new_tokens = min(rows.ids[b].shape[1], rows.output_length) - prompt_len
        _trim_steps(row)
    stats.new_tokens = sum(row.new_tokens for row in stats.rows)
    stats.accepted_lengths = [n for row in stats.rows for n in row.accepted_lengths]
    stats.total_time_s = time.perf_counter() - start_time
    sequences = rows.output(pad_token_id(generation_config))
    if generation_config.return_dict_in_generate:
        return GenerateDecoderOnlyOutput(sequences=sequences)
    return sequences


def _trim_steps(row: GenerationStats) -> None:
    """A row that ran past the length it is cut to (rows without an EOS criterion run until every row stopped):
    its steps count only the tokens it keeps."""
    excess = sum(row.accepted_lengths) + 1 - row.new_tokens
    while excess > 0 and row.accepted_lengths:
        last = row.accepted_lengths[-1]
        if last <= excess:
            row.accepted_lengths.pop()
            row.target_forwards -= 1
            excess -= last
        else:
            row.accepted_lengths[-1] -= excess
            excess = 0


class _BatchLoop:
    """The state of the active (unfinished) rows between steps, and the step itself."""

    def __init__(
        self, model, draft, settings, stats, rows, selectors, draft_temperature, request, model_kwargs, clock
    ):
        self.model, self.draft, self.settings, self.stats, self.rows = model, draft, settings, stats, rows
        self.clock = clock
        self.selectors, self.draft_temperature, self.request = selectors, draft_temperature, request
        self.model_kwargs = model_kwargs
        self.chain = settings.decoding_mode == "chain"
        self.processing = len(selectors[0].logits_processor) > 0
        target_model = targets.unwrap_target(model)
        self.mask_dtype = next(target_model.parameters()).dtype
        self.layer_types = getattr(targets.text_config(target_model), "layer_types", None)

    # ------------------------------------------------------------------------------------------------ set-up
    def start(
        self, cache, active, valid, last_pos, roots, input_ids, prompt_embeds, prompt_feats, prefill_marks
    ) -> None:
        """After the prefill: drop the rows it finished, run the draft on every remaining row's prompt."""
        device = input_ids.device
        self.device, self.cache, self.active = device, cache, list(active)
        rows = torch.tensor(active, device=device)
        if len(active) < input_ids.shape[0]:
            cache.batch_select_indices(rows)
        self.target_valid = valid.index_select(0, rows)  # (R, P) over the target cache
        self.last_pos = last_pos.index_select(
            -2, rows
        )  # (..., R, 1): position of each row's newest cached token
        self.roots = torch.tensor([roots[b] for b in active], device=device)  # (R,) tokens not yet verified
        with Timer(self.stats, "draft_prefill_time_s"):
            self._draft_prefill(input_ids, valid, prompt_embeds, prompt_feats, rows)
        # accepted tokens of plain steps the draft has not consumed yet ((R, p) each with its feature)
        self.pending_tokens, self.pending_feats = None, None
        self.planner = self._planner(prefill_marks, input_ids.shape[1])

    def _draft_prefill(self, input_ids, valid, prompt_embeds, prompt_feats, rows) -> None:
        draft, stats = self.draft, self.stats
        model = targets.unwrap_target(self.model)
        layout = {**self.model_kwargs, **getattr(draft, "_layout_kwargs", {})}
        spans = batch_visual_spans(model, input_ids, valid, layout)
        lengths = valid.sum(dim=1)  # (B,) prompt tokens per row
        length = input_ids.shape[1]
        # right-align each row's prompt (the draft's context is right-padded)
        shift = (length - lengths).index_select(0, rows)
        index = (torch.arange(length, device=self.device)[None] + shift[:, None]).clamp_max(length - 1)
        real = torch.arange(length, device=self.device)[None] < lengths.index_select(0, rows)[:, None]
        ids = input_ids.index_select(0, rows).gather(1, index).masked_fill(~real, 0)

        def aligned(x):
            x = x.index_select(0, rows)
            return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))

        compressed = draft.compressor is not None
        embeds = aligned(prompt_embeds)
        next_embeds = draft.embed_tokens(self.roots[:, None]).to(embeds.dtype)  # (R, 1, h)
        row_len = lengths.index_select(0, rows)
        short = (row_len < length).nonzero().flatten()  # rows whose root lands inside the padded width
        embeds[short, row_len[short]] = next_embeds[short, 0]
        ctx = draft.prepare_context(
            ids,
            embeds,
            aligned(prompt_feats),
            next_embeds=next_embeds,
            spans=[spans[b] for b in self.active] if compressed else None,
            valid=real,
        )
        for b, row in enumerate(stats.rows):
            row.visual_tokens = row.draft_visual_tokens = sum(s.length for s in spans[b])
        for i, b in enumerate(self.active):
            row = stats.rows[b]
            if compressed:
                row.draft_visual_tokens = ctx.kept_visual_tokens[i]
            row.compressor_choice = ctx.choices[i] if ctx.choices else None
        stats.visual_tokens = sum(row.visual_tokens for row in stats.rows)
        stats.draft_visual_tokens = sum(row.draft_visual_tokens for row in stats.rows)
        choices = {stats.rows[b].compressor_choice for b in self.active}
        stats.compressor_choice = choices.pop() if len(choices) == 1 else "mixed"
        n = ctx.fused.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=self.device).tril()
        allowed = causal[None] & ctx.valid[:, None, :]
        self.draft_cache = DynamicCache()
        out = draft(
            fused_inputs=ctx.fused,
            position_ids=ctx.position_ids,
            attention_mask=additive_mask(allowed, ctx.fused.dtype)[:, None],
            past_key_values=self.draft_cache,
        ).last_hidden_state
        last = ctx.valid.sum(dim=1) - 1
        self.root_hidden = out[torch.arange(out.shape[0], device=self.device), last]  # (R, h)
        self.draft_valid = ctx.valid.clone()  # (R, P') over the draft cache
        self.row_positions = lengths.index_select(0, rows)  # (R,) draft position of each row's next row
        self.positions_host = self.row_positions.tolist()  # the same on the host (no read per step)

    def _planner(self, prefill_marks, prompt_len: int) -> BudgetPlanner | None:
        """The automatic budget (no explicit one): costs learned per target, device, dtype and batch size from the
        steps decoding runs (`budget.planner_for`)."""
        if not self.clock.enabled:
            return None
        prefill_s = self.clock.seconds(*prefill_marks)
        return planner_for(
            self.draft,
            self.model,
            self.device,
            self.stats,
            prefill_s,
            prompt_len,
            len(self.active),
            "chain" if self.chain else "tree",
        )

    # ------------------------------------------------------------------------------------------------ a step
    def _verify_inputs(self, tokens, depths, ancestors) -> dict:
        size, n = tokens.shape
        if (
            n == 1
        ):  # roots alone (plain steps): the model's own causal mask over the padded cache, as plain generate
            attention_mask = torch.cat([self.target_valid, self.target_valid.new_ones(size, 1)], dim=1).long()
        else:
            attention_mask = verify_mask(
                self.cache, ancestors, depths, self.layer_types, self.mask_dtype, self.target_valid
            )
        return dict(
            input_ids=tokens,
            attention_mask=attention_mask,
            position_ids=self.last_pos + 1 + depths,
            cache=self.cache,
            use_cache=True,
            output_hidden_states=self.request,
            **decode_extras(self.model_kwargs, n, size),
        )

    def _step_settings(self) -> DecodingSettings:
        """This step's budget: a sampled spine as deep as the measured acceptance pays for (automatic budget); a
        chain (one child per node) in chain mode; the settings' tree otherwise."""
        if self.planner is not None and self.draft_temperature is not None:
            k = self.planner.spine_depth()
        elif self.chain:
            k = self.settings.num_draft_tokens  # None: the planner grows the chain
        else:
            return self.settings
        return dataclasses.replace(self.settings, tree_top_k=1, tree_depth=k, tree_total_tokens=k)

    def _draft(self, plain: bool) -> list[DraftTree]:
        draft = self.draft
        if plain:
            return [DraftTree.root_only(r) for r in self.roots]
        if self.pending_tokens is not None:  # catch up on the tokens of the plain steps before
            pending = self.pending_tokens.shape[1]
            counts = torch.full((len(self.active),), pending, device=self.device)
            self.root_hidden, self.draft_valid = feed_rows(
                draft,
                self.draft_cache,
                self.draft_valid,
                self.pending_tokens,
                self.pending_feats,
                counts,
                self.row_positions,
                max_position=max(self.positions_host) + pending - 1,
            )
            self.row_positions = self.row_positions + counts
            self.positions_host = [p + pending for p in self.positions_host]
            self.pending_tokens = self.pending_feats = None
        self.draft_prefix = self.draft_cache.get_seq_length()
        settings = self._step_settings()
        common = dict(
            max_row_position=max(self.positions_host), cache_valid=self.draft_valid, max_depth=self.depth_left
        )
        if self.draft_temperature is None:
            return build_trees(
                draft,
                self.draft_cache,
                self.root_hidden,
                self.roots,
                self.row_positions,
                settings,
                self.planner,
                stop_tokens=self.rows.stops,
                **common,
            )
        return build_sampled_trees(
            draft,
            self.draft_cache,
            self.root_hidden,
            self.roots,
            self.row_positions,
            settings,
            self.draft_temperature,
            process=[self.selectors[b].scores for b in self.active] if self.processing else None,
            prefix_ids=[self.rows.ids[b] for b in self.active],
            **common,
        )

    def run(self) -> None:
        stats, rows = self.stats, self.rows
        while self.active:
            # the deepest node any row can still use (one token left everywhere: a plain step)
            self.depth_left = (
                None
                if rows.cap is None
                else max(0, *(room(rows.cap, rows.ids[b].shape[1]) for b in self.active))
            )
            last = self.depth_left == 0
            plain = last if self.planner is None else self.planner.plain_step(last=last)
            clock = self.clock
            step_start = clock.mark()
            with Timer(stats, "draft_time_s"):
                trees = self._draft(plain)
            draft_end = clock.mark()

            # ---- verify every row's tree in one target forward
            with Timer(stats, "verify_time_s"):
                with Timer(stats, "verify_mask_time_s"):
                    tokens, depths, ancestors = _pad_trees(trees, self.device)
                    inputs = self._verify_inputs(tokens, depths, ancestors)
                forward_start = clock.mark()
                with Timer(stats, "verify_forward_time_s"):
                    out = self.model(**inputs)
                forward_end = clock.mark()
                stats.target_forwards += 1
                with Timer(stats, "accept_time_s"):
                    walks = []
                    # greedy without processors: every node's choice in one transfer for the whole batch
                    argmax = None
                    if self.draft_temperature is None and not self.processing:
                        argmax = out.logits.argmax(-1).tolist()
                    for i, (b, tree) in enumerate(zip(self.active, trees)):
                        size = tree.tokens.shape[0]
                        logits, select = out.logits[i, :size], self.selectors[b]
                        if tree.child_q is not None:
                            walks.append(accept_sampled(tree, logits, rows.ids[b], select))
                        else:
                            choices = argmax[i][:size] if argmax is not None else None
                            walks.append(accept_greedy(tree, logits, rows.ids[b], select, choices))
            n = tokens.shape[1]
            kept, emitted_all = [], []
            for b, (path, emitted) in zip(self.active, walks):
                added = rows.append(b, emitted)
                row = stats.rows[b]
                row.target_forwards += 1
                row.accepted_lengths.append(added)
                stats.accepted_lengths.append(added)
                kept.append(path[:added])
                emitted_all.append(emitted)
            still = [i for i, b in enumerate(self.active) if not rows.done(b)]
            if not still:
                break

            # ---- compact: the rows still running keep their accepted paths, right-aligned again
            with Timer(stats, "verify_time_s"), Timer(stats, "compact_time_s"):
                dropping = len(still) < len(self.active)
                keep_rows = torch.tensor(still, device=self.device) if dropping else None
                counts = torch.tensor([len(kept[i]) for i in still], device=self.device)
                m = max(len(kept[i]) for i in still)
                # each row's kept tree indices, right-padded (for the cache) and left-padded (for the draft's feed)
                right = torch.tensor(
                    [kept[i] + kept[i][-1:] * (m - len(kept[i])) for i in still], device=self.device
                )
                keep = torch.tensor(
                    [kept[i][:1] * (m - len(kept[i])) + kept[i] for i in still], device=self.device
                )
                hf_private.realign_cache(self.cache, keep_rows, n, right, counts)
                self.target_valid = _realign_valid(self.target_valid, keep_rows, m, counts)
                feats = target_features.select_features(out.hidden_states, self.draft.config.target_layers)
                if dropping:
                    feats = feats.index_select(0, keep_rows)
                    self.last_pos = self.last_pos.index_select(-2, keep_rows)
                feats = feats.gather(1, keep[..., None].expand(-1, -1, feats.shape[-1]))  # (R', m, n*h)
                self.last_pos = self.last_pos + counts[:, None]
            feed_start = clock.mark()
            with Timer(stats, "draft_time_s"):
                tokens_in = torch.tensor(
                    [[0] * (m - len(kept[i])) + emitted_all[i][: len(kept[i])] for i in still],
                    device=self.device,
                )
                self._feed(plain, keep_rows, tokens_in, feats, counts, still, [len(kept[i]) for i in still])
                self.roots = tokens_in[:, -1]
            self.active = [self.active[i] for i in still]
            if self.planner is not None and plain:
                self.planner.observe_plain(clock.seconds(forward_start, forward_end))
            elif self.planner is not None:
                end = clock.mark()
                step_s = clock.seconds(step_start, end)  # (the latest mark first: one wait for the step)
                draft_s = clock.seconds(step_start, draft_end)
                forward_s = clock.seconds(forward_start, forward_end)
                feed_s = clock.seconds(feed_start, end)
                mean = lambda values: sum(values) / len(values)  # noqa: E731
                self.planner.observe(
                    n=n - 1,
                    levels=trees[0].levels,
                    predicted=trees[0].predicted,
                    drafted=mean([min(len(p), t.tokens.shape[0] - 1) for (p, _), t in zip(walks, trees)]),
                    accepted=mean([len(p) - 1 for p, _ in walks]),
                    emitted=mean([len(e) for _, e in walks]),
                    forward_s=forward_s,
                    overhead_s=step_s - forward_s - draft_s - feed_s,
                    draft_s=draft_s + feed_s,
                    spine=trees[0].child_q is not None,
                    nodes=[
                        t.verified_nodes(p) for (p, _), t in zip(walks, trees) if t.node_probs is not None
                    ],
                )
        if self.planner is not None:
            self.planner.finish()

    def _feed(self, plain: bool, keep_rows, tokens, feats, counts, still, host_counts) -> None:
        """The draft side after a step: drop finished rows, consume the accepted tokens (later, after plain steps).
        still: the indices of the rows kept; host_counts: `counts` on the host."""
        if keep_rows is not None:
            self.positions_host = [self.positions_host[i] for i in still]
            self.draft_cache.batch_select_indices(keep_rows)
            self.draft_valid = self.draft_valid.index_select(0, keep_rows)
            self.row_positions = self.row_positions.index_select(0, keep_rows)
            if self.pending_tokens is not None:
                self.pending_tokens = self.pending_tokens.index_select(0, keep_rows)
                self.pending_feats = self.pending_feats.index_select(0, keep_rows)
        if plain:  # one token per row: the draft catches up before its next tree
            if self.pending_tokens is None:
                self.pending_tokens, self.pending_feats = tokens, feats
            else:
                self.pending_tokens = torch.cat([self.pending_tokens, tokens], dim=1)
                self.pending_feats = torch.cat([self.pending_feats, feats], dim=1)
            return
        extra = self.draft_cache.get_seq_length() - self.draft_prefix
        if extra:
            self.draft_cache.crop(-extra)  # the tree rows
        top = max(max(p + c - 1, 0) for p, c in zip(self.positions_host, host_counts))
        self.root_hidden, self.draft_valid = feed_rows(
            self.draft, self.draft_cache, self.draft_valid, tokens, feats, counts, self.row_positions, top
        )
        self.row_positions = self.row_positions + counts
        self.positions_host = [p + c for p, c in zip(self.positions_host, host_counts)]
