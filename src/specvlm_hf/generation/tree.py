"""EAGLE-2 dynamic draft tree: build, verify in one target forward, accept, compact the caches.

One decoding step, given the verified tokens x_0..x_n (x_n, the "root", not yet seen by the target):

1. Draft (`tree_policy.py`, where the tree's shape is decided): the root row's output scores level-1 candidates (top_k of the draft distribution, over the draft's
   own vocabulary: with a reduced `draft_vocab_size` a step costs O(h * Vd) and columns map to target ids). For each of the
   next `depth - 1` levels the `top_k` best nodes by cumulative draft log-probability are fed to the draft in
   ONE batched forward (tree attention mask over the draft cache), each proposing its `top_k` children.
2. Rerank: keep the `total_tokens` best candidates by cumulative log-probability (ancestor-closed).
3. Verify: root + kept nodes go through the target's standard forward once, with a 4-D tree attention mask
   (each node sees the prefix, its ancestors and itself) and per-node positions (prefix end + depth).
4. Accept: walk down from the root. Greedy: at a node the target's next token y is the argmax of its processed
   logits; if a child carries y, descend, else y is the bonus token (exact by construction).
   Sampling: the tree is drawn instead of picked (`build_sampled_tree`): a spine of `tree_depth` nodes, each the
   first child drawn at the node above, plus sibling leaves with the rest of the budget; every node's children are
   a sample WITHOUT replacement from the draft distribution q there (Gumbel-top-k on log q), and the shape is
   fixed before anything is drawn (never ranked by the drawn values), so verification can use recursive
   rejection sampling: the i-th child c is accepted with min(1, p_i(c) / q_i(c)); on rejection
   p_{i+1} = norm(max(p_i - q_i, 0)) and q_{i+1} = q_i without c, renormalised; if every child is rejected the
   bonus token is drawn from the last residual. The emitted token then has exactly the target's processed
   distribution p (lossless); the first drawn child is accepted with probability 1 - TV(p, q), close to 1 for a
   good draft even where p is flat, which a fixed top-k child set cannot match -- hence the deep spine.
5. Compact: target cache keeps prefix + root + accepted path; draft cache drops all tree rows and consumes the
   accepted tokens with the target's true features.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import DynamicCache
from transformers.generation.stopping_criteria import MaxLengthCriteria
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .. import hf_private
from ..targets import families as targets
from ..targets import features as target_features
from .acceptance import Selector, accept_greedy, accept_sampled
from .budget import planner_for
from .clock import StepClock
from .masks import verify_mask
from .prefill import draft_prefill, draft_prompt_ids, feed_draft, last_prompt_positions, target_prefill
from .settings import DecodingSettings, GenerationStats, Timer, refuse_inexact_processors
from .tree_policy import DraftTree, build_sampled_tree, build_tree

if TYPE_CHECKING:
    from ..draft.modeling_specvlm import SpecVLMDraftModel


def refuse_unsupported(generation_config, synced_gpus: bool, model_kwargs: dict, batch_size: int = 1) -> None:
    """Raise, before any work, for what our decoding loops (tree mode, and batches in both modes) cannot do; drop
    the tokenizer arguments they do not use (stop strings arrive as a stopping criterion, `routing.py`)."""
    if generation_config.return_dict_in_generate and (
        generation_config.output_scores
        or generation_config.output_logits
        or generation_config.output_attentions
        or generation_config.output_hidden_states
    ):
        fix = "Drop them, or use decoding_mode='chain'." if batch_size == 1 else "Drop them."
        raise ValueError(
            f"SpecVLM {'tree decoding' if batch_size == 1 else 'decoding of a batch'} returns sequences only; "
            f"output_scores/output_logits/output_attentions/output_hidden_states are not supported. {fix}"
        )
    if generation_config.num_beams not in (None, 1):
        raise ValueError("SpecVLM speculative decoding does not support beam search (num_beams > 1).")
    refuse_inexact_processors(generation_config)
    if synced_gpus:
        raise ValueError(
            "SpecVLM speculative decoding does not support synced_gpus (FSDP/ZeRO-3 generation)."
        )
    for unused in ("tokenizer", "assistant_tokenizer"):
        model_kwargs.pop(unused, None)


def tree_decoding(
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
    """The decoding loop run by `vlm.generate(..., assistant_model=draft)` in tree mode (a `custom_generate`)."""
    draft = assistant_model
    refuse_unsupported(generation_config, synced_gpus, model_kwargs)
    stats = GenerationStats(decoding_mode="tree")
    draft.last_generation_stats = stats
    start_time = time.perf_counter()
    select = Selector(logits_processor, generation_config.do_sample)
    # sampling draws the tree from the draft at the target's temperature (any q is lossless; a close one accepts)
    draft_temperature = (generation_config.temperature or 1.0) if generation_config.do_sample else None
    request = target_features.hidden_state_request(draft.config.target_layers)
    prompt_len = input_ids.shape[1]
    if model_kwargs.get("inputs_embeds") is not None:  # generate(inputs_embeds=...): input_ids may be empty
        prompt_len = max(prompt_len, model_kwargs["inputs_embeds"].shape[1])

    # the planner's times (automatic budget only): synchronized device timing, `clock.py`
    clock = StepClock(input_ids.device, enabled=settings.auto_tree)
    # ---- prefill: target on the prompt, first token, draft on the prompt's features
    with Timer(stats, "prefill_time_s"):
        prefill_marks = [clock.mark()]
        outputs, prompt_embeds, prompt_feats = target_prefill(model, draft, input_ids, model_kwargs)
        prefill_marks.append(clock.mark())
        stats.target_forwards += 1
        cache = outputs.cache
        if cache is None:
            raise RuntimeError("SpecVLM tree decoding needs the target's KV cache (use_cache=True).")
        # the draft's context: the prompt positions the prefill ran (after a reused cache: the new turn only)
        prompt_ids = draft_prompt_ids(input_ids, prompt_embeds.shape[1])
        # sliding-window layers keep rejected-node states until compaction (restored as the caller had them)
        restore_recording = hf_private.start_past_recording(cache)
        last_pos = last_prompt_positions(
            model, model_kwargs, torch.tensor([[prompt_len]], device=input_ids.device)
        )
        root = select(input_ids, outputs.logits[0, -1])
    input_ids, finished = _append(input_ids, [root], stopping_criteria, streamer, stats)

    layout = {**model_kwargs, **getattr(draft, "_layout_kwargs", {})}
    spans = targets.visual_spans(targets.unwrap_target(model), prompt_ids, layout)
    draft_cache = DynamicCache()
    if not finished:
        with Timer(stats, "draft_prefill_time_s"):
            root_t = torch.tensor([root], device=input_ids.device)
            root_hidden = draft_prefill(
                draft, prompt_ids, prompt_embeds, prompt_feats, root_t[None], spans, draft_cache, stats
            )
    row_position = prompt_ids.shape[
        1
    ]  # draft position of the next row (pairs f_{n} with the token after the root)
    target_model = targets.unwrap_target(model)
    mask_dtype = next(target_model.parameters()).dtype
    layer_types = getattr(targets.text_config(target_model), "layer_types", None)

    def verify_inputs(tokens, ancestors, depths) -> dict:
        """The verify forward's inputs for tree nodes on top of the cache."""
        n = tokens.shape[0]
        return dict(
            input_ids=tokens[None],
            # a lone root (a plain step) attends to everything cached: the model's own causal mask, as in plain
            # generate (cheaper than a 4-D mask over the whole cache)
            attention_mask=None if n == 1 else verify_mask(cache, ancestors, depths, layer_types, mask_dtype),
            position_ids=last_pos + 1 + depths.view(*([1] * (last_pos.dim() - 1)), n),
            cache=cache,
            use_cache=True,
            output_hidden_states=request,
            **decode_extras(model_kwargs, n),
        )

    # verify forwards take a 4-D tree mask: run them through an attention implementation that takes one
    restore_attention = hf_private.use_mask_attention(model)
    try:
        planner = None
        if settings.auto_tree and not finished:
            prefill_s = clock.seconds(*prefill_marks)
            planner = planner_for(draft, model, input_ids.device, stats, prefill_s, prompt_embeds.shape[1])

        # accepted tokens the draft has not consumed yet, each with the target feature it pairs with (plain steps)
        pending_tokens: list[int] = []
        pending_feats: list[torch.Tensor] = []
        cap, stops = length_cap(stopping_criteria), stop_tokens(stopping_criteria, input_ids.device)
        while not finished:
            depth_left = room(cap, input_ids.shape[1])
            # (one token left: the bonus token alone fills it, a plain step)
            plain = depth_left == 0 if planner is None else planner.plain_step(last=depth_left == 0)
            # ---- draft a tree (or, backing off, verify the root alone: a plain decoding step)
            step_start = clock.mark()
            with Timer(stats, "draft_time_s"):
                if plain:
                    tree = DraftTree.root_only(root_t)
                else:
                    if pending_tokens:  # catch up on the tokens of the plain steps before
                        root_hidden = feed_draft(
                            draft, draft_cache, pending_tokens, torch.cat(pending_feats), row_position
                        )
                        row_position += len(pending_tokens)
                        pending_tokens, pending_feats = [], []
                    draft_prefix = draft_cache.get_seq_length()
                    if draft_temperature is None:
                        tree = build_tree(
                            draft,
                            draft_cache,
                            root_hidden,
                            root_t,
                            row_position,
                            settings,
                            planner,
                            max_depth=depth_left,
                            stop_tokens=stops,
                        )
                    else:
                        step_settings = settings
                        if planner is not None:  # a spine as deep as the measured acceptance pays for
                            depth = planner.spine_depth()
                            step_settings = dataclasses.replace(
                                settings, tree_top_k=1, tree_depth=depth, tree_total_tokens=depth
                            )
                        # children drawn from the draft's distribution processed like the target's
                        tree = build_sampled_tree(
                            draft,
                            draft_cache,
                            root_hidden,
                            root_t,
                            row_position,
                            step_settings,
                            draft_temperature,
                            process=select.scores if len(logits_processor) > 0 else None,
                            prefix_ids=input_ids,
                            max_depth=depth_left,
                        )
            draft_end = clock.mark()
            n = tree.tokens.shape[0]

            # ---- verify it in one target forward
            with Timer(stats, "verify_time_s"):
                with Timer(stats, "verify_mask_time_s"):
                    inputs = verify_inputs(tree.tokens, tree.ancestors, tree.depths)
                forward_start = clock.mark()
                with Timer(stats, "verify_forward_time_s"):
                    out = model(**inputs)
                forward_end = clock.mark()
                stats.target_forwards += 1
                logits = out.logits[0]  # (n, V)

                # ---- accept the longest matching path (greedy) / rejection-sample down the drawn tree
                with Timer(stats, "accept_time_s"):
                    if tree.child_q is None:
                        path, emitted = accept_greedy(tree, logits, input_ids, select)
                    else:
                        path, emitted = accept_sampled(tree, logits, input_ids, select)
            before = input_ids.shape[1]
            input_ids, finished = _append(input_ids, emitted, stopping_criteria, streamer, stats)
            added = input_ids.shape[1] - before
            stats.accepted_lengths.append(added)

            # ---- compact the target cache to the tokens kept (all but the last one, as plain generate leaves it:
            # the path, cut where generation stopped); the draft consumes the accepted tokens with their features
            with Timer(stats, "verify_time_s"), Timer(stats, "compact_time_s"):
                keep = torch.tensor(path[:added], device=input_ids.device)
                hf_private.compact_cache(cache, n, keep)
            if finished:
                break
            with Timer(stats, "verify_time_s"), Timer(stats, "compact_time_s"):
                last_pos = last_pos + len(path)
                feats = target_features.select_features(out.hidden_states, draft.config.target_layers)[
                    0, keep
                ]
            feed_start = clock.mark()
            with Timer(stats, "draft_time_s"):
                if plain:
                    pending_tokens += emitted
                    pending_feats.append(feats)
                else:
                    draft_cache.crop(-(draft_cache.get_seq_length() - draft_prefix))
                    root_hidden = feed_draft(draft, draft_cache, emitted, feats, row_position)
                    row_position += len(emitted)
                root_t = torch.tensor(emitted[-1:], device=input_ids.device)
            if planner is not None and plain:
                planner.observe_plain(clock.seconds(forward_start, forward_end))
            elif planner is not None:
                end = clock.mark()
                step_s = clock.seconds(step_start, end)  # (the latest mark first: one wait for the step)
                draft_s = clock.seconds(step_start, draft_end)
                forward_s = clock.seconds(forward_start, forward_end)
                feed_s = clock.seconds(feed_start, end)
                planner.observe(
                    n=n - 1,
                    levels=tree.levels,
                    predicted=tree.predicted,
                    drafted=min(len(path), n - 1),
                    accepted=len(path) - 1,
                    emitted=len(emitted),
                    forward_s=forward_s,
                    overhead_s=step_s - forward_s - draft_s - feed_s,
                    draft_s=draft_s + feed_s,
                    spine=tree.child_q is not None,
                    nodes=None if tree.node_probs is None else [tree.verified_nodes(path)],
                )

        if planner is not None:
            planner.finish()
    finally:
        restore_attention()
        restore_recording()
    if streamer is not None:
        streamer.end()
    stats.total_time_s = time.perf_counter() - start_time
    if generation_config.return_dict_in_generate:
        return GenerateDecoderOnlyOutput(sequences=input_ids, cache=cache)
    return input_ids


def length_cap(stopping_criteria) -> int | None:
    """The length at which the max-length criterion stops a sequence (None: none does)."""
    caps = [c.max_length for c in stopping_criteria if isinstance(c, MaxLengthCriteria)]
    return min(caps) if caps else None


def stop_tokens(stopping_criteria, device) -> torch.Tensor | None:
    """The token ids whose emission stops a sequence (the EOS criteria's; None: none does)."""
    ids = [
        torch.as_tensor(c.eos_token_id).reshape(-1).cpu()
        for c in stopping_criteria
        if getattr(c, "eos_token_id", None) is not None
    ]
    return torch.cat(ids).to(device) if ids else None


def room(cap: int | None, length: int) -> int | None:
    """The deepest draft node a step can still use on a sequence of `length` tokens stopped at `cap`: a path of d
    nodes adds d tokens and the bonus one, so nodes deeper than this add nothing but verify cost (None: no cap)."""
    return None if cap is None else cap - length - 1


def _append(input_ids, tokens: list[int], stopping_criteria, streamer, stats: GenerationStats):
    """Append tokens one at a time, stopping exactly where plain generate would."""
    finished = False
    added = []
    for token in tokens:
        input_ids = torch.cat([input_ids, input_ids.new_tensor([[token]])], dim=1)
        added.append(token)
        if bool(stopping_criteria(input_ids, None).any()):
            finished = True
            break
    stats.new_tokens += len(added)
    if streamer is not None and added:
        streamer.put(input_ids.new_tensor(added))
    return input_ids, finished


def decode_extras(model_kwargs: dict, n: int, batch_size: int | None = None) -> dict:
    """Per-family inputs a decode-step forward over n tokens per sequence needs besides ids, mask, positions and
    cache (batch_size: the sequences it runs, when fewer than the prompts')."""
    extras = {}
    for key in ("token_type_ids", "mm_token_type_ids"):
        value = model_kwargs.get(key)
        if value is not None:
            extras[key] = value.new_zeros(batch_size or value.shape[0], n)
    return extras
