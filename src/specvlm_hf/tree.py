"""EAGLE-2 dynamic draft tree: build, verify in one target forward, accept, compact the caches.

One decoding step, given the verified tokens x_0..x_n (x_n, the "root", not yet seen by the target):

1. Draft: the root row's output scores level-1 candidates (top_k of the draft distribution, over the draft's
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

import time
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache
from transformers.generation.utils import GenerateDecoderOnlyOutput

from . import target_features, targets
from .decoding import (
    DecodingSettings,
    GenerationStats,
    Timer,
    draft_logits,
    draft_prefill,
    draft_prompt_ids,
    draft_step,
    target_prefill,
)
from .modeling_specvlm import SpecVLMDraftModel, additive_mask


@dataclass
class DraftTree:
    tokens: torch.Tensor  # (n,) root first, then nodes in topological order
    parents: list[int]  # tree index of each node's parent (-1 for the root)
    depths: torch.Tensor  # (n,) 0 for the root
    ancestors: torch.Tensor  # (n, n) bool, ancestors[i, j]: node j is i or an ancestor of i
    # sampled trees only: node -> the draft distribution (Vd,) its children were drawn from, in the draft's own
    # vocabulary (`vocab_ids` maps a column to its target token id; None = same ids)
    child_q: dict[int, torch.Tensor] | None = None
    vocab_ids: torch.Tensor | None = None


@torch.no_grad()
def build_tree(
    draft: SpecVLMDraftModel,
    draft_cache: DynamicCache,
    root_hidden: torch.Tensor,
    root_token: torch.Tensor,
    row_position: int,
    settings: DecodingSettings,
) -> DraftTree:
    """Grow the EAGLE-2 dynamic tree (greedy decoding) from the root row's draft output.

    root_hidden: (1, 1, h) draft output of the row that consumed the root token.
    row_position: draft position of level-1 rows. The tree rows are appended to `draft_cache`; the caller crops.
    """
    k, depth, total = settings.tree_top_k, settings.tree_depth, settings.tree_total_tokens
    device = root_hidden.device
    prefix_len = draft_cache.get_seq_length()
    # draft distribution over its own vocabulary (Vd columns; ids maps a column to its target token, None = same)
    logits, vocab_ids = draft_logits(draft, root_hidden[0, -1])
    logp = _draft_logp(logits, None)  # (Vd,)
    k = min(k, logp.shape[-1])
    row_scores, row_cols = logp.topk(k)  # level-1 candidates, (k,), most likely first
    cand_cols, cand_scores, row_cands = [row_cols], [row_scores], []
    row_cand = torch.arange(k, device=device)  # candidate id of each row at the current level
    parent_hidden = root_hidden[0, -1].expand(k, -1)  # (k, h)
    n_rows = k * max(depth - 1, 0)
    # additive attention mask of every tree row the draft may run: the prefix is visible, and among the tree rows
    # each row sees itself from the start; a new level's rows copy their parents' view of the levels above
    dtype = root_hidden.dtype  # the draft's
    tree_part = torch.full((n_rows, n_rows), torch.finfo(dtype).min, dtype=dtype, device=device)
    mask = torch.cat([tree_part.new_zeros(n_rows, prefix_len), tree_part.fill_diagonal_(0.0)], dim=1)
    level_positions = torch.arange(row_position, row_position + depth, device=device)[:, None].expand(-1, k)
    n_cands = k
    for level in range(1, depth):
        lo, hi = (level - 1) * k, level * k  # this level's rows
        hidden = draft_step(
            draft,
            row_cols if vocab_ids is None else vocab_ids[row_cols],  # draft column -> target token id
            parent_hidden,
            position_ids=level_positions[level - 1 : level],
            max_position=row_position + level - 1,
            attention_mask=mask[None, None, lo:hi, : prefix_len + hi],
            past_key_values=draft_cache,
        )  # (k, h)
        logp = _draft_logp(draft_logits(draft, hidden)[0], None)  # (k, Vd)
        child_lp, child_cols = logp.topk(k, dim=-1)  # (k, k)
        child_scores = (row_scores[:, None] + child_lp).flatten()  # cumulative log-prob of each child
        child_cols = child_cols.flatten()
        cand_cols.append(child_cols)
        cand_scores.append(child_scores)
        row_cands.append(row_cand)  # the parents of this level's k children each
        if level == depth - 1:
            break
        best = child_scores.topk(k).indices  # the k best children become the next level's rows
        parent_row = best // k
        row_cols, row_scores = child_cols[best], child_scores[best]
        row_cand = best + n_cands
        parent_hidden = hidden[parent_row]
        mask[hi : hi + k, prefix_len : prefix_len + hi] = mask[lo:hi, prefix_len : prefix_len + hi][
            parent_row
        ]
        n_cands += k * k

    cols = torch.cat(cand_cols)
    tokens = cols if vocab_ids is None else vocab_ids[cols]  # tokens outside the draft vocabulary never enter
    scores = torch.cat(cand_scores)
    parents = torch.full((k,), -1, dtype=torch.long, device=device)  # level 1: the root's children
    if row_cands:
        parents = torch.cat([parents, torch.stack(row_cands)[:, :, None].expand(-1, -1, k).flatten()])
    depths = _candidate_depths(k, len(cand_cols), device)
    return _select_tree(root_token, tokens, scores, parents, depths, _best_candidates(scores, depths, total))


_DEPTHS: dict = {}


def _candidate_depths(k: int, levels: int, device) -> torch.Tensor:
    """Depth of every greedy-tree candidate: level 1 holds k candidates, every later level k * k (cached)."""
    key = (k, levels, device)
    if key not in _DEPTHS:
        sizes = torch.tensor([k] + [k * k] * (levels - 1))
        _DEPTHS[key] = torch.arange(1, levels + 1).repeat_interleave(sizes).to(device)
    return _DEPTHS[key]


def draw_without_replacement(logp: torch.Tensor, n: int) -> torch.Tensor:
    """n columns drawn without replacement from q = exp(logp) (Vd,), in draw order (Gumbel-top-k: the n largest
    of log q + G with G = -log(E), E ~ Exp(1)). Columns with q = 0 are never drawn, so fewer may come back."""
    # E > 0 keeps every Gumbel key finite (E == 0 would make an infinite key), so a key is -inf exactly where q = 0
    noise = torch.empty_like(logp).exponential_().clamp_(min=torch.finfo(logp.dtype).tiny)
    keys, columns = (logp - noise.log()).topk(n)
    if n == 1:  # the largest key of a distribution is finite: nothing to filter, no host sync (a spine level)
        return columns
    return columns[keys > float("-inf")]


def sibling_counts(spine: int, extra: int, max_per_level: int) -> list[int]:
    """Extra children per spine level of a sampled tree: one per level from the top down, then a second, ...

    Under rejection sampling a node's reach probability falls with its depth and with its draw rank among its
    siblings, so the shallow levels get the extra candidates first. The shape is fixed before anything is drawn."""
    counts = [0] * spine
    for _rank in range(max(max_per_level, 0)):
        for level in range(spine):
            if extra <= 0:
                return counts
            counts[level] += 1
            extra -= 1
    return counts


@torch.no_grad()
def build_sampled_tree(
    draft: SpecVLMDraftModel,
    draft_cache: DynamicCache,
    root_hidden: torch.Tensor,
    root_token: torch.Tensor,
    row_position: int,
    settings: DecodingSettings,
    temperature: float,
) -> DraftTree:
    """Draw the tree for sampling: a spine of first draws with sibling leaves (module docstring, step 4).

    The spine has min(tree_depth, tree_total_tokens) levels; every spine node's children are drawn without
    replacement from q = softmax(draft logits / temperature) (Gumbel-top-k), the first drawn child continues the
    spine, the others are leaves (`sibling_counts`: the remaining budget, shallow levels first, at most
    tree_top_k - 1 per level). Only spine rows go through the draft, one per level.
    """
    device = root_hidden.device
    spine = min(settings.tree_depth, settings.tree_total_tokens)
    siblings = sibling_counts(spine, settings.tree_total_tokens - spine, settings.tree_top_k - 1)
    logits, vocab_ids = draft_logits(draft, root_hidden[0, -1])
    hidden = root_hidden[0, -1:]  # (1, h)
    tokens, parents, depths, child_q = [root_token.view(1)], [-1], [0], {}
    node = 0  # tree index of the current spine node
    for level in range(1, spine + 1):
        logp = _draft_logp(logits.view(-1), temperature)  # (Vd,) log q at the spine node
        n_children = min(1 + siblings[level - 1], logp.shape[-1])
        drawn = draw_without_replacement(logp, n_children)
        if drawn.numel() == 0:
            break
        child_q[node] = logp.exp()
        first = len(parents)  # tree index of the first drawn child
        tokens.append(drawn if vocab_ids is None else vocab_ids[drawn])
        parents += [node] * drawn.numel()
        depths += [level] * drawn.numel()
        if level == spine:
            break
        hidden = draft_step(
            draft,
            tokens[-1][:1],  # the first drawn child continues the spine
            hidden,
            position_ids=torch.full((1, 1), row_position + level - 1, dtype=torch.long, device=device),
            max_position=row_position + level - 1,
            past_key_values=draft_cache,  # one row: it sees the prefix and the spine above it (causal)
        )  # (1, h)
        logits = draft_logits(draft, hidden)[0]
        node = first
    return DraftTree(
        torch.cat(tokens),
        parents,
        torch.tensor(depths, device=device),
        _ancestor_mask(parents, device),  # the ancestry is known on the host: one scatter
        child_q=child_q,
        vocab_ids=vocab_ids,
    )


def _draft_logp(logits: torch.Tensor, temperature: float | None) -> torch.Tensor:
    """log q over the draft vocabulary; the sampled tree draws from softmax(logits / temperature)."""
    if temperature is not None and temperature != 1.0:
        logits = logits.float() / temperature
    return torch.log_softmax(logits, dim=-1, dtype=torch.float32)  # computed in float32, one kernel


def _best_candidates(scores, depths, total: int) -> torch.Tensor:
    """Greedy tree: the `total` candidates with the best cumulative draft log-probability, ancestor-closed below."""
    total = min(total, scores.shape[0])
    # a child's cumulative score never exceeds its parent's; the depth term breaks ties towards ancestors
    rank = scores - 1e-4 * depths.to(scores.dtype)
    rank = torch.nan_to_num(rank, neginf=-1e30)
    keep = torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device)
    keep[rank.topk(total).indices] = True
    return keep


def _select_tree(root_token, tokens, scores, parents, depths, keep: torch.Tensor) -> DraftTree:
    """Lay the kept candidates (`keep`, bool over candidates; closed under ancestry here) out as the tree.

    A tree holds tens of nodes: its layout is worked out on the host from two short lists, in a handful of kernels
    instead of one pass per depth."""
    device = tokens.device
    parent_list = parents.tolist()
    kept = set(keep.nonzero().flatten().tolist())
    for c in list(kept):  # close under ancestry (only exact score ties leave a kept node's parent out)
        p = parent_list[c]
        while p >= 0 and p not in kept:
            kept.add(p)
            p = parent_list[p]
    order = sorted(kept)  # ascending candidate ids: parents before children
    index = {c: i + 1 for i, c in enumerate(order)}
    parent_of = [-1] + [index[parent_list[c]] if parent_list[c] >= 0 else 0 for c in order]
    kept_t = torch.tensor(order, dtype=torch.long, device=device)
    node_depths = torch.cat([depths.new_zeros(1), depths[kept_t]])
    tree_tokens = torch.cat([root_token.view(1), tokens[kept_t]])
    return DraftTree(tree_tokens, parent_of, node_depths, _ancestor_mask(parent_of, device))


def _ancestor_mask(parent_of: list[int], device) -> torch.Tensor:
    """(n, n) bool, [i, j]: node j is i or an ancestor of i, from each node's parent (parents come first)."""
    n = len(parent_of)
    lines: list[list[int]] = []
    for i, parent in enumerate(parent_of):
        lines.append((lines[parent] if parent >= 0 else []) + [i])
    rows = [i for i, line in enumerate(lines) for _ in line]
    cols = [j for line in lines for j in line]
    ancestors = torch.zeros(n, n, dtype=torch.bool, device=device)
    ancestors[torch.tensor(rows, device=device), torch.tensor(cols, device=device)] = True
    return ancestors


def compact_cache(cache, n_tail: int, keep: torch.Tensor) -> None:
    """Keep, of the last `n_tail` cached positions, only those at `keep` (indices into the tail), in place."""
    for layer in cache.layers:
        if layer.keys is None or layer.keys.numel() == 0:
            continue
        head_k, tail_k = layer.keys[:, :, :-n_tail], layer.keys[:, :, -n_tail:]
        head_v, tail_v = layer.values[:, :, :-n_tail], layer.values[:, :, -n_tail:]
        layer.keys = torch.cat([head_k, tail_k.index_select(2, keep)], dim=2)
        layer.values = torch.cat([head_v, tail_v.index_select(2, keep)], dim=2)
        if hasattr(layer, "cumulative_length"):
            layer.cumulative_length -= n_tail - keep.numel()
            window = layer.sliding_window
            if layer.keys.shape[2] > window - 1:
                layer.keys, layer.values = layer.keys[:, :, -window + 1 :], layer.values[:, :, -window + 1 :]


def verify_mask(cache, ancestors: torch.Tensor, depths: torch.Tensor, layer_types, dtype: torch.dtype):
    """Attention mask for verifying a tree of n nodes on top of `cache`, as the target's forward expects it.

    Full-attention layers see the whole prefix; sliding-window layers (Gemma 3) see the prefix keys they hold,
    minus those that fall out of each node's window. Returns a (1, 1, n, kv) tensor, or a dict keyed by layer
    type when the target mixes both kinds.
    """
    n = ancestors.shape[0]
    device = ancestors.device
    past = cache.get_seq_length()
    full = torch.ones(n, past + n, dtype=torch.bool, device=device)
    full[:, past:] = ancestors
    sliding_layers = [layer for layer in cache.layers if getattr(layer, "sliding_window", None)]
    if not sliding_layers or layer_types is None:
        return additive_mask(full, dtype)[None, None]
    layer = sliding_layers[0]
    window = layer.sliding_window
    held = min(
        layer.keys.shape[2] if layer.keys is not None else 0, window - 1
    )  # prefix keys the layer returns
    # prefix key j sits `held - j` tokens before the root; node i is depths[i] tokens after it
    distance = (held - torch.arange(held, device=device))[None, :] + depths[:, None]
    sliding = torch.ones(n, held + n, dtype=torch.bool, device=device)
    sliding[:, :held] = distance < window
    sliding[:, held:] = ancestors
    return {
        "full_attention": additive_mask(full, dtype)[None, None],
        "sliding_attention": additive_mask(sliding, dtype)[None, None],
    }


# attention implementations whose kernels take the verify forward's 4-D additive tree mask as given
MASK_ATTENTION = ("sdpa", "eager")


def _mask_attention_for(model) -> str | None:
    """None when the target's text decoder takes a 4-D tree mask as loaded; else the implementation to verify with
    (flex_attention segfaults on such a mask on CPU, flash-attention kernels cannot take one, paged ones need a
    paged cache)."""
    if targets.text_config(model)._attn_implementation in MASK_ATTENTION:
        return None
    return "sdpa" if getattr(model, "_supports_sdpa", False) else "eager"


def check_mask_attention(model) -> None:
    """Raise (before any work) if the target's attention implementation cannot verify a tree and cannot be switched."""
    model = targets.unwrap_target(model)
    if _mask_attention_for(model) is not None and not model._can_set_attn_implementation():
        loaded = targets.text_config(model)._attn_implementation
        raise ValueError(
            f"SpecVLM tree decoding verifies a draft tree with a 4-D attention mask, which attn_implementation="
            f"{loaded!r} cannot take, and {type(model).__name__} cannot switch its attention implementation at run "
            "time. Load the target with attn_implementation='sdpa' (or 'eager'), or pass decoding_mode='chain'."
        )


def _config_path(root, wanted) -> tuple[str, ...] | None:
    """Sub-config keys leading from `root` to the config object `wanted` (() when it is root)."""
    queue = [((), root)]
    while queue:
        path, config = queue.pop(0)
        if config is wanted:
            return path
        for key in getattr(config, "sub_configs", {}):
            sub = getattr(config, key, None)
            if sub is not None:
                queue.append(((*path, key), sub))
    return None


def use_mask_attention(model):
    """Switch the target's text decoder to an attention implementation that takes the tree mask (public
    `set_attn_implementation`, text decoder only); returns the function that restores every config as it was."""
    model = targets.unwrap_target(model)
    replacement = _mask_attention_for(model)
    if replacement is None:
        return lambda: None
    check_mask_attention(model)
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}
    stack = [model.config]
    while stack:  # and the sub-configs no module owns
        config = stack.pop()
        configs.setdefault(id(config), config)
        stack += [
            getattr(config, key) for key in getattr(config, "sub_configs", {}) if getattr(config, key, None)
        ]
    saved = [(config, config._attn_implementation_internal) for config in configs.values()]

    def restore():
        for config, value in saved:
            config._attn_implementation_internal = value

    text = targets.text_config(model)
    request = replacement
    for key in reversed(_config_path(model.config, text) or ()):
        request = {key: request}
    try:
        model.set_attn_implementation(request)
        if text._attn_implementation != replacement:
            raise ValueError(
                f"Could not switch {type(model).__name__}'s text decoder to attn_implementation={replacement!r} for "
                "SpecVLM tree verification. Load the target with attn_implementation='sdpa', or pass "
                "decoding_mode='chain'."
            )
    except BaseException:
        restore()
        raise
    return restore


class _Selector:
    """Next-token choice from target logits, exactly as plain generate makes it (processors, then argmax/sample)."""

    def __init__(self, logits_processor, do_sample: bool):
        self.logits_processor = logits_processor
        self.do_sample = do_sample

    def scores(self, prefix_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        # logits: (V,) raw target logits for the token after prefix_ids (1, L) -> processed scores (1, V)
        scores = logits[None].float()
        if len(self.logits_processor) > 0:
            scores = self.logits_processor(prefix_ids, scores)
        return scores

    def probs(self, prefix_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """p: the target's processed distribution (V,), in float64 for the rejection-sampling residuals."""
        return torch.softmax(self.scores(prefix_ids, logits)[0].double(), dim=-1)

    def __call__(self, prefix_ids: torch.Tensor, logits: torch.Tensor) -> int:
        scores = self.scores(prefix_ids, logits)
        if self.do_sample:
            probs = torch.softmax(scores, dim=-1)  # p: the target's processed distribution
            return int(torch.multinomial(probs, 1))
        return int(scores.argmax(-1))


def accept_greedy(tree: DraftTree, logits: torch.Tensor, prefix: torch.Tensor, select) -> tuple[list, list]:
    """Greedy walk: descend while a child carries the target's choice y. Returns (path, emitted tokens)."""
    children: dict[tuple[int, int], int] = {}
    tree_tokens = tree.tokens.tolist()
    for i in range(1, len(tree_tokens)):
        children.setdefault((tree.parents[i], tree_tokens[i]), i)
    path, emitted, node = [0], [], 0
    while True:
        token = select(prefix, logits[node])
        emitted.append(token)
        child = children.get((node, token))
        if child is None:
            return path, emitted
        path.append(child)
        node = child
        prefix = torch.cat([prefix, tree.tokens[child].view(1, 1)], dim=1)


def accept_sampled(
    tree: DraftTree, logits: torch.Tensor, prefix: torch.Tensor, selector: _Selector
) -> tuple[list, list]:
    """Recursive rejection sampling down a sampled tree (module docstring). Returns (path, emitted tokens).

    logits: (n, V) raw target logits of the tree nodes; every emitted token has the target's distribution."""
    kids: list[list[int]] = [[] for _ in tree.parents]
    for i, parent in enumerate(tree.parents[1:], start=1):
        kids[parent].append(i)  # ascending tree index = draw order among siblings
    tree_tokens = tree.tokens.tolist()
    vocab = logits.shape[-1]
    path, emitted, node = [0], [], 0
    while True:
        p = selector.probs(prefix, logits[node])  # (V,) target distribution at this node
        chosen = None
        if kids[node]:
            q = p.new_zeros(vocab)  # the draft distribution the children were drawn from, on target ids
            draft_q = tree.child_q[node].double()
            if tree.vocab_ids is None:
                q[: draft_q.shape[0]] = draft_q
            else:
                q[tree.vocab_ids] = draft_q
            for child in kids[node]:
                token = tree_tokens[child]
                # c ~ q_i: accept with min(1, p_i(c) / q_i(c))
                if float(torch.rand(())) * float(q[token]) < float(p[token]):
                    chosen = child
                    break
                p = (p - q).clamp_min_(0.0)  # residual: p_{i+1} = norm(max(p_i - q_i, 0))
                p = p / p.sum()
                q[token] = 0.0  # the next child was drawn from q_i without c (no replacement)
                q = q / q.sum().clamp_min(1e-300)
        if chosen is None:
            emitted.append(int(torch.multinomial(p, 1)))  # bonus token from the last residual
            return path, emitted
        emitted.append(tree_tokens[chosen])
        path.append(chosen)
        node = chosen
        prefix = torch.cat([prefix, tree.tokens[chosen].view(1, 1)], dim=1)


def _unsupported_outputs(generation_config) -> None:
    if generation_config.return_dict_in_generate and (
        generation_config.output_scores
        or generation_config.output_logits
        or generation_config.output_attentions
        or generation_config.output_hidden_states
    ):
        raise ValueError(
            "SpecVLM tree decoding returns sequences only; output_scores/output_logits/output_attentions/"
            "output_hidden_states are not supported. Drop them, or use decoding_mode='chain'."
        )
    if generation_config.num_beams not in (None, 1):
        raise ValueError("SpecVLM speculative decoding does not support beam search (num_beams > 1).")


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
    _unsupported_outputs(generation_config)
    if synced_gpus:
        raise ValueError("SpecVLM tree decoding does not support synced_gpus (FSDP/ZeRO-3 generation).")
    for unused in ("tokenizer", "assistant_tokenizer"):
        model_kwargs.pop(unused, None)
    stats = GenerationStats(decoding_mode="tree")
    draft.last_generation_stats = stats
    start_time = time.perf_counter()
    select = _Selector(logits_processor, generation_config.do_sample)
    # sampling draws the tree from the draft at the target's temperature (any q is lossless; a close one accepts)
    draft_temperature = (generation_config.temperature or 1.0) if generation_config.do_sample else None
    request = target_features.hidden_state_request(draft.config.target_layers)
    prompt_len = input_ids.shape[1]
    if model_kwargs.get("inputs_embeds") is not None:  # generate(inputs_embeds=...): input_ids may be empty
        prompt_len = max(prompt_len, model_kwargs["inputs_embeds"].shape[1])

    # ---- prefill: target on the prompt, first token, draft on the prompt's features
    with Timer(stats, "prefill_time_s"):
        outputs, prompt_embeds, prompt_feats = target_prefill(model, draft, input_ids, model_kwargs)
        stats.target_forwards += 1
        # the draft's context: the prompt positions the prefill ran (after a reused cache: the new turn only)
        prompt_ids = draft_prompt_ids(input_ids, prompt_embeds.shape[1])
        cache = outputs.cache
        if cache is None:
            raise RuntimeError("SpecVLM tree decoding needs the target's KV cache (use_cache=True).")
        recording = [getattr(layer, "record_past", None) for layer in cache.layers]
        if hasattr(cache, "activate_past_recording"):
            cache.activate_past_recording()  # sliding-window layers keep rejected-node states until compaction
        # position of the last cached token as the prefill saw it: the explicit positions of the decoding loop
        # continue from there (PaliGemma's prepare_inputs_for_generation adds 1 to the 0-based `position_ids`)
        position_ids = model_kwargs.get("position_ids")
        if position_ids is not None:
            last_pos = position_ids[..., -1:].clone()  # (..., 1, 1)
        else:
            last_pos = torch.tensor([[prompt_len - 1]], device=input_ids.device)
        last_pos = last_pos + targets.get_target_spec(model).position_offset
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
    mask_dtype = next(targets.unwrap_target(model).parameters()).dtype
    layer_types = getattr(targets.text_config(targets.unwrap_target(model)), "layer_types", None)
    # verify forwards take a 4-D tree mask: run them through an attention implementation that takes one
    restore_attention = use_mask_attention(model)
    try:
        while not finished:
            # ---- draft a tree
            with Timer(stats, "draft_time_s"):
                draft_prefix = draft_cache.get_seq_length()
                if draft_temperature is None:
                    tree = build_tree(draft, draft_cache, root_hidden, root_t, row_position, settings)
                else:
                    tree = build_sampled_tree(
                        draft, draft_cache, root_hidden, root_t, row_position, settings, draft_temperature
                    )
            n = tree.tokens.shape[0]

            # ---- verify it in one target forward
            with Timer(stats, "verify_time_s"):
                tree_positions = last_pos + 1 + tree.depths.view(*([1] * (last_pos.dim() - 1)), n)
                out = model(
                    input_ids=tree.tokens[None],
                    attention_mask=verify_mask(cache, tree.ancestors, tree.depths, layer_types, mask_dtype),
                    position_ids=tree_positions,
                    cache=cache,
                    use_cache=True,
                    output_hidden_states=request,
                    **_decode_extras(model_kwargs, n),
                )
                stats.target_forwards += 1
                logits = out.logits[0]  # (n, V)

                # ---- accept the longest matching path (greedy) / rejection-sample down the drawn tree
                if tree.child_q is None:
                    path, emitted = accept_greedy(tree, logits, input_ids, select)
                else:
                    path, emitted = accept_sampled(tree, logits, input_ids, select)
            before = input_ids.shape[1]
            input_ids, finished = _append(input_ids, emitted, stopping_criteria, streamer, stats)
            added = input_ids.shape[1] - before
            stats.accepted_lengths.append(added)

            # ---- compact the target cache to the tokens kept (all but the last one, as plain generate leaves it: the
            # path, cut where generation stopped), then feed the draft the target's true features
            with Timer(stats, "verify_time_s"):
                keep = torch.tensor(path[:added], device=input_ids.device)
                compact_cache(cache, n, keep)
            if finished:
                break
            with Timer(stats, "verify_time_s"):
                last_pos = last_pos + len(path)
                feats = target_features.select_features(out.hidden_states, draft.config.target_layers)[
                    0, keep
                ]
            with Timer(stats, "draft_time_s"):
                draft_cache.crop(-(draft_cache.get_seq_length() - draft_prefix))
                next_tokens = torch.tensor(emitted, device=input_ids.device)
                m = len(emitted)
                positions = torch.arange(row_position, row_position + m, device=input_ids.device)[None]
                root_hidden = draft_step(
                    draft,
                    next_tokens,
                    feats,
                    position_ids=positions,
                    max_position=row_position + m - 1,
                    past_key_values=draft_cache,
                )[None, -1:]
                row_position += m
                root_t = next_tokens[-1:]

    finally:
        restore_attention()
        for layer, record in zip(cache.layers, recording, strict=True):
            if record is not None:
                layer.record_past = record  # as the caller's cache was
    if streamer is not None:
        streamer.end()
    stats.total_time_s = time.perf_counter() - start_time
    if generation_config.return_dict_in_generate:
        return GenerateDecoderOnlyOutput(sequences=input_ids, cache=cache)
    return input_ids


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


def _decode_extras(model_kwargs: dict, n: int) -> dict:
    """Per-family inputs a decode-step forward needs besides ids, mask, positions and cache."""
    extras = {}
    for key in ("token_type_ids", "mm_token_type_ids"):
        value = model_kwargs.get(key)
        if value is not None:
            extras[key] = value.new_zeros(value.shape[0], n)
    return extras
