"""The draft tree policy: which candidate tokens one decoding step verifies (EAGLE-2 dynamic tree, sampled spine).

`build_tree` (greedy decoding): the root row's draft output scores level-1 candidates (top_k of the draft
distribution over the draft's own vocabulary); for each of the next `depth - 1` levels the `top_k` best nodes by
cumulative draft log-probability are fed to the draft in ONE batched forward (tree attention mask over the draft
cache), each proposing its `top_k` children; then the `total_tokens` best candidates by cumulative log-probability
are kept (ancestor-closed). `build_sampled_tree` (sampling): a spine of `tree_depth` first draws with sibling
leaves, every node's children drawn WITHOUT replacement from the draft distribution, its shape fixed before anything
is drawn (what recursive rejection sampling in `tree.accept_sampled` needs to stay lossless).

Both return a `DraftTree` that `tree.tree_decoding` verifies in one target forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..backends import draft_logits, draft_step
from .budget import FIRST, MAX_DEPTH, SIBLING, BudgetPlanner
from .masks import additive_mask
from .settings import DecodingSettings

if TYPE_CHECKING:
    from transformers.cache_utils import DynamicCache

    from ..draft.modeling_specvlm import SpecVLMDraftModel


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
    levels: int = 0  # draft forwards that built the tree (its cost)
    predicted: float | None = None  # greedy trees chosen by a planner: the verified nodes' summed worth
    # greedy trees chosen by a planner, per node (root excluded): draft probability given its parent, and kind
    # (`budget.FIRST`: its parent's most likely child; `budget.SIBLING`)
    node_probs: list[float] | None = None
    node_kinds: list[int] | None = None
    token_list: list[int] | None = None  # `tokens` on the host, where the builder read them anyway

    def verified_nodes(self, path: list[int]) -> tuple[list[float], list[int], list[int], set[int]] | None:
        """What the planner learns from this tree's verification (`BudgetPlanner.observe`'s `nodes`): the nodes'
        draft probabilities given their parents, kinds and parents (indices into them, -1: the root), and which
        nodes the accepted path (tree indices, root first) holds."""
        if self.node_probs is None:
            return None
        parents = [p - 1 for p in self.parents[1:]]
        return self.node_probs, self.node_kinds, parents, {i - 1 for i in path[1:]}

    @classmethod
    def root_only(cls, root_token: torch.Tensor) -> DraftTree:
        """No draft: the root verified alone (a plain decoding step)."""
        root = root_token.view(1)
        return cls(root, [-1], root.new_zeros(1), torch.ones(1, 1, dtype=torch.bool, device=root.device))


@torch.no_grad()
def build_tree(
    draft: SpecVLMDraftModel,
    draft_cache: DynamicCache,
    root_hidden: torch.Tensor,
    root_token: torch.Tensor,
    row_position: int,
    settings: DecodingSettings,
    planner: BudgetPlanner | None = None,
    max_depth: int | None = None,
    stop_tokens: torch.Tensor | None = None,
) -> DraftTree:
    """Grow the EAGLE-2 dynamic tree (greedy decoding) from the root row's draft output: `build_trees` for one
    sequence. root_hidden: (1, 1, h) draft output of the row that consumed the root token; row_position: draft
    position of level-1 rows."""
    position = torch.tensor([row_position], device=root_hidden.device)
    return build_trees(
        draft,
        draft_cache,
        root_hidden[:, -1],
        root_token.view(1),
        position,
        settings,
        planner,
        row_position,
        max_depth=max_depth,
        stop_tokens=stop_tokens,
    )[0]


@torch.no_grad()
def build_trees(
    draft: SpecVLMDraftModel,
    draft_cache: DynamicCache,
    root_hidden: torch.Tensor,
    root_tokens: torch.Tensor,
    row_positions: torch.Tensor,
    settings: DecodingSettings,
    planner: BudgetPlanner | None = None,
    max_row_position: int | None = None,
    cache_valid: torch.Tensor | None = None,
    max_depth: int | None = None,
    stop_tokens: torch.Tensor | None = None,
) -> list[DraftTree]:
    """Grow one EAGLE-2 dynamic tree per sequence of a batch, every level of every tree in ONE draft forward.

    root_hidden: (B, h) draft output of the row that consumed each sequence's root token; root_tokens: (B,).
    row_positions: (B,) draft position of each sequence's level-1 rows (`max_row_position`: their maximum, when the
    caller knows it). cache_valid: (B, P) bool, False on `draft_cache` rows a sequence must not see (padding and
    holes of a batch; None: all visible). The tree rows are appended to `draft_cache`; the caller crops.
    planner: with no explicit budget, decides top_k, how deep to grow and how many candidates to keep
    (`budget.BudgetPlanner`, on the batch's mean per-sequence probabilities); `settings`' tree budget otherwise.
    Every tree keeps the same number of candidates (ancestor closure may add a node on exact score ties), except
    that none below an end of answer is kept.
    max_depth: the deepest level whose tokens can still be kept (`room`); nothing deeper is drafted.
    stop_tokens: target token ids that end generation (EOS): a candidate carrying one gets no children (whether the
    target accepts it or not, nothing below it is ever emitted), so a confident draft does not fill a step's
    budget past the end of the answer.
    """
    if planner is None:
        k, depth, total = settings.tree_top_k, settings.tree_depth, settings.tree_total_tokens
    else:
        k, depth, total = settings.tree_top_k or planner.top_k(), MAX_DEPTH, None  # (chains: top_k 1)
    depth = min(depth, max_depth or depth)
    device = root_hidden.device
    bsz, h = root_hidden.shape
    prefix_len = draft_cache.get_seq_length()
    if max_row_position is None:
        max_row_position = int(row_positions.max())
    # draft distribution over its own vocabulary (Vd columns; ids maps a column to its target token, None = same)
    logits, vocab_ids = draft_logits(draft, root_hidden)
    logp = _draft_logp(logits, None)  # (B, Vd)
    k = min(k, logp.shape[-1])
    row_scores, row_cols = logp.topk(k)  # level-1 candidates, (B, k), most likely first
    # a planner ranks candidates by their worth (log, `_worth`); a given budget by cumulative draft log-probability
    table = None if planner is None else planner.state.nodes.log_rates(device)
    row_ranks = row_scores if table is None else _worth(row_scores, row_scores.new_zeros(bsz, 1), k, table)
    # per candidate: token column, log-prob given its parent, rank (worth, or cumulative log-prob for a given budget)
    cand_cols, cand_lp, cand_ranks, row_cands = [row_cols], [row_scores], [row_ranks], []
    row_cand = torch.arange(k, device=device).expand(bsz, k)  # candidate id of each row at the current level
    parent_hidden = root_hidden[:, None].expand(bsz, k, h)
    n_rows = k * max(depth - 1, 0)
    # additive attention mask of every tree row the draft may run: the prefix is visible (where valid), and among
    # the tree rows each row sees itself from the start; a new level's rows copy their parents' view of the levels
    # above
    dtype = root_hidden.dtype  # the draft's
    tree_part = torch.full((n_rows, n_rows), torch.finfo(dtype).min, dtype=dtype, device=device)
    tree_part = tree_part.fill_diagonal_(0.0).expand(bsz, n_rows, n_rows)
    if cache_valid is None:
        prefix_part = tree_part.new_zeros(bsz, n_rows, prefix_len)
    else:
        prefix_part = additive_mask(cache_valid, dtype)[:, None].expand(bsz, n_rows, prefix_len)
    mask = torch.cat([prefix_part, tree_part], dim=2)  # (B, n_rows, prefix + n_rows)
    level_positions = row_positions[:, None].expand(bsz, k)
    n_cands = k
    values: list[float] = []  # planner: every candidate's worth so far (batch mean)
    top = 1.0  # planner: the best row worth of the level before (the root's: 1)
    for level in range(1, depth):
        if planner is not None:  # (one read for both)
            latest, rows = _mean_sorted(cand_ranks[-1], row_ranks)
            values += latest
            ratio, top = rows[0] / max(top, 1e-12), rows[0]
            if not planner.keep_growing(sorted(values, reverse=True), rows, level - 1, ratio, depth):
                break
        lo, hi = (level - 1) * k, level * k  # this level's rows
        hidden = draft_step(
            draft,
            row_cols if vocab_ids is None else vocab_ids[row_cols],  # draft column -> target token id
            parent_hidden,
            position_ids=level_positions + (level - 1),
            max_position=max_row_position + level - 1,
            attention_mask=mask[:, None, lo:hi, : prefix_len + hi],
            past_key_values=draft_cache,
        )  # (B, k, h)
        logp = _draft_logp(draft_logits(draft, hidden)[0], None)  # (B, k, Vd)
        child_lp, child_cols = logp.topk(k, dim=-1)  # (B, k, k): each child's log-prob given its parent
        if stop_tokens is not None:  # nothing follows the end of the answer
            parents = row_cols if vocab_ids is None else vocab_ids[row_cols]
            ends = (parents[..., None] == stop_tokens).any(-1)  # (isin may sync with a device to sort)
            child_lp = child_lp.masked_fill(ends[..., None], float("-inf"))
        child_lp = child_lp.flatten(1)
        child_scores = row_scores.repeat_interleave(k, dim=-1) + child_lp  # cumulative log-prob of each child
        child_ranks = child_scores if table is None else _worth(child_lp, row_ranks, k, table)
        child_cols = child_cols.flatten(1)
        cand_cols.append(child_cols)
        cand_lp.append(child_lp)
        cand_ranks.append(child_ranks)
        row_cands.append(row_cand)  # the parents of this level's k children each
        if level == depth - 1:
            break
        best = child_ranks.topk(k).indices  # (B, k): the k best children become the next level's rows
        parent_row = best // k
        row_cols, row_scores = child_cols.gather(1, best), child_scores.gather(1, best)
        row_ranks = child_ranks.gather(1, best)
        row_cand = best + n_cands
        parent_hidden = hidden.gather(1, parent_row[..., None].expand(bsz, k, h))
        seen = mask[:, lo:hi, prefix_len : prefix_len + hi]  # (B, k, hi): this level's rows' view of the tree
        mask[:, hi : hi + k, prefix_len : prefix_len + hi] = seen.gather(
            1, parent_row[..., None].expand(bsz, k, hi)
        )
        n_cands += k * k

    cols = torch.cat(cand_cols, dim=1)  # (B, C)
    tokens = cols if vocab_ids is None else vocab_ids[cols]  # tokens outside the draft vocabulary never enter
    ranks = torch.cat(cand_ranks, dim=1)
    parents = torch.full((bsz, k), -1, dtype=torch.long, device=device)  # level 1: the root's children
    if row_cands:
        children = torch.stack(row_cands, dim=1)[..., None].expand(-1, -1, -1, k).flatten(1)  # (B, C - k)
        parents = torch.cat([parents, children], dim=1)
    depths = _candidate_depths(k, len(cand_cols), device)
    predicted = None
    if planner is not None:
        ranked = _mean_sorted(ranks)
        total, _ = planner.best_size(ranked, len(cand_cols) - 1)
        predicted = sum(ranked[:total])
    keep = _best_candidates(ranks, depths, total)
    # the layouts are worked out on the host: ONE transfer for the batch (which candidates are kept, their parents,
    # their tokens and the roots: the acceptance walk reads the tokens too)
    # (a planner also reads every candidate's probability given its parent, in fixed point in the same transfer: as
    # a ratio of two rounded cumulative probabilities it would lose a deep node's precision)
    c = keep.shape[1]
    parts = [keep.long(), parents, tokens, root_tokens.view(bsz, 1)]
    if planner is not None:
        parts.append((torch.cat(cand_lp, dim=1).exp() * _PROB_SCALE).round().long())
    host = torch.cat(parts, dim=1).tolist()
    trees = []
    for b in range(bsz):
        row = host[b]
        kept = [i for i, flag in enumerate(row[:c]) if flag]
        tree = _select_tree(
            root_tokens[b],
            tokens[b],
            row[c : 2 * c],
            depths,
            kept,
            row[2 * c : 3 * c + 1],
            row[3 * c + 1 :],
            k,
        )
        tree.levels, tree.predicted = len(cand_cols) - 1, predicted
        trees.append(tree)
    return trees


_PROB_SCALE = 1 << 30  # draft probabilities cross to the host as integers in the layout's transfer


def _worth(child_lp: torch.Tensor, parent_worth: torch.Tensor, k: int, table) -> torch.Tensor:
    """Log worth of a level's candidates (B, m * k): k children per parent, most likely first (the first is of kind
    `FIRST`, the others `SIBLING`), each worth its parent's (`parent_worth` (B, m), log; the root's: 0) times the
    measured acceptance after an accepted parent of its kind and its draft probability given the parent (`child_lp`,
    log; `table`: `NodeCalibration.log_rates`), at most 1: a child never outranks its parent, so ranking by worth
    keeps the kept set ancestor-closed."""
    edges, log_rates = table
    bins = torch.bucketize(child_lp.exp(), edges).clamp_(max=edges.numel() - 1)
    kinds = (torch.arange(child_lp.shape[-1], device=child_lp.device) % k != 0).long()
    own = (child_lp + log_rates[kinds, bins]).clamp_(max=0.0)
    return parent_worth.repeat_interleave(k, dim=-1) + own


def _mean_sorted(*scores: torch.Tensor):
    """Cumulative log-probabilities (B, C) -> the batch's mean of each sequence's probabilities sorted best first
    (for one sequence: its probabilities, best first); given several, a list for each, in one read."""
    means = [s.exp().sort(dim=-1, descending=True).values.mean(dim=0) for s in scores]
    if len(means) == 1:
        return means[0].tolist()
    host = torch.cat(means).tolist()
    out, start = [], 0
    for m in means:
        out.append(host[start : start + m.numel()])
        start += m.numel()
    return out


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
    temperature: float | None,
    process=None,
    prefix_ids: torch.Tensor | None = None,
    max_depth: int | None = None,
) -> DraftTree:
    """Draw the tree for sampling from the root row's draft output (1, 1, h): `build_sampled_trees` for one
    sequence; prefix_ids (1, L) ends at the root."""
    position = torch.tensor([row_position], device=root_hidden.device)
    return build_sampled_trees(
        draft,
        draft_cache,
        root_hidden[:, -1],
        root_token.view(1),
        position,
        settings,
        temperature,
        process,
        None if prefix_ids is None else [prefix_ids],
        row_position,
        max_depth=max_depth,
    )[0]


@torch.no_grad()
def build_sampled_trees(
    draft: SpecVLMDraftModel,
    draft_cache: DynamicCache,
    root_hidden: torch.Tensor,
    root_tokens: torch.Tensor,
    row_positions: torch.Tensor,
    settings: DecodingSettings,
    temperature: float | None,
    process=None,
    prefix_ids: list[torch.Tensor] | None = None,
    max_row_position: int | None = None,
    cache_valid: torch.Tensor | None = None,
    max_depth: int | None = None,
) -> list[DraftTree]:
    """Draw one tree per sequence for sampling: a spine of first draws with sibling leaves (module docstring of
    `tree.py`, step 4), every sequence's spine level in one draft forward.

    root_hidden: (B, h); root_tokens: (B,); row_positions, max_row_position, cache_valid, max_depth as in
    `build_trees`. The spine has min(tree_depth, tree_total_tokens, max_depth) levels; every spine node's children
    are drawn without replacement from q = softmax(draft logits / temperature) (Gumbel-top-k), the first drawn child continues the
    spine, the others are leaves (`sibling_counts`: the remaining budget, shallow levels first, at most
    tree_top_k - 1 per level). Only spine rows go through the draft, one per level.

    process: `(prefix (1, L), logits (V,)) -> scores (1, V)` (or one per sequence), the logits processors the
    target's tokens are
    chosen with (temperature, top-k, top-p, repetition penalty, ...); given, q = softmax(process(prefix, draft
    logits on the target's vocabulary)) with prefix_ids[b] (1, L_b) ending at sequence b's root, plus the spine
    drawn so far. Any q keeps rejection sampling exact (the verifier reads `child_q`); one shaped like the target's
    p accepts more.
    """
    device = root_hidden.device
    bsz = root_hidden.shape[0]
    if max_row_position is None:
        max_row_position = int(row_positions.max())
    spine = min(settings.tree_depth, settings.tree_total_tokens, max_depth or settings.tree_depth)
    siblings = sibling_counts(spine, settings.tree_total_tokens - spine, settings.tree_top_k - 1)
    logits, vocab_ids = draft_logits(draft, root_hidden)  # (B, Vd)
    hidden = root_hidden[:, None]  # (B, 1, h)
    ids = vocab_ids
    if process is not None:  # q over the target's vocabulary: children are target ids
        vocab_ids = None
    trees = [
        ([root_tokens[b].view(1)], [-1], [0], {}) for b in range(bsz)
    ]  # tokens, parents, depths, child_q
    nodes = [0] * bsz  # tree index of each sequence's current spine node
    spine_tokens = []  # (B,) per level: the first drawn child of every sequence
    prefix_mask = None
    if cache_valid is not None:
        prefix_mask = additive_mask(cache_valid, hidden.dtype)[:, None, None]  # (B, 1, 1, P)
    for level in range(1, spine + 1):
        if process is None:
            logp = _draft_logp(logits, temperature)  # (B, Vd) log q at the spine nodes
        else:
            full = logits if ids is None else draft.full_vocab_logits(logits, ids)
            rows = []
            for b in range(bsz):
                drawn_so_far = [t[:1].view(1, 1) for t in trees[b][0][1:]]
                prefix = torch.cat([prefix_ids[b], *drawn_so_far], dim=1)
                row_process = process[b] if isinstance(process, list) else process
                rows.append(row_process(prefix, full[b]).view(-1))
            logp = torch.log_softmax(torch.stack(rows), dim=-1, dtype=torch.float32)
        n_children = min(1 + siblings[level - 1], logp.shape[-1])
        firsts = []
        for b in range(bsz):
            tokens, parents, depths, child_q = trees[b]
            drawn = draw_without_replacement(logp[b], n_children)  # never empty: the largest key is finite
            child_q[nodes[b]] = logp[b].exp()
            first = len(parents)  # tree index of the first drawn child
            tokens.append(drawn if vocab_ids is None else vocab_ids[drawn])
            parents += [nodes[b]] * drawn.numel()
            depths += [level] * drawn.numel()
            nodes[b] = first
            firsts.append(tokens[-1][:1])
        if level == spine:
            break
        spine_tokens.append(torch.cat(firsts))
        mask = None
        if prefix_mask is not None:  # the prefix where valid, and the spine above (causal)
            mask = torch.cat([prefix_mask, prefix_mask.new_zeros(bsz, 1, 1, level)], dim=-1)
        hidden = draft_step(
            draft,
            spine_tokens[-1][:, None],  # the first drawn children continue the spines
            hidden,
            position_ids=(row_positions + level - 1)[:, None],
            max_position=max_row_position + level - 1,
            attention_mask=mask,
            past_key_values=draft_cache,  # one row: it sees the prefix and the spine above it
        )  # (B, 1, h)
        logits = draft_logits(draft, hidden[:, 0])[0]
    return [
        DraftTree(
            torch.cat(tokens),
            parents,
            torch.tensor(depths, device=device),
            _ancestor_mask(parents, device),  # the ancestry is known on the host: one scatter
            child_q=child_q,
            vocab_ids=vocab_ids,
            levels=max(depths[-1] - 1, 0),
        )
        for tokens, parents, depths, child_q in trees
    ]


def _draft_logp(logits: torch.Tensor, temperature: float | None) -> torch.Tensor:
    """log q over the draft vocabulary; the sampled tree draws from softmax(logits / temperature)."""
    if temperature is not None and temperature != 1.0:
        logits = logits.float() / temperature
    return torch.log_softmax(logits, dim=-1, dtype=torch.float32)  # computed in float32, one kernel


def _best_candidates(scores, depths, total: int) -> torch.Tensor:
    """Greedy trees: per sequence, the `total` candidates (of scores (B, C)) with the best cumulative draft
    log-probability, ancestor-closed below, none the draft rules out (-inf: below an end of answer). Returns (B, C)
    bool."""
    total = min(total, scores.shape[-1])
    # a child's cumulative score never exceeds its parent's; the depth term breaks ties towards ancestors
    rank = scores - 1e-4 * depths.to(scores.dtype)
    rank = torch.nan_to_num(rank, neginf=-1e30)
    keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    keep.scatter_(-1, rank.topk(total, dim=-1).indices, True)
    return keep & (scores > float("-inf"))


def _select_tree(
    root_token,
    tokens,
    parent_list: list[int],
    depths,
    kept_list: list[int],
    host_tokens: list[int] | None = None,
    host_probs: list[int] | None = None,
    k: int = 1,
) -> DraftTree:
    """Lay the kept candidates (`kept_list`, candidate ids; closed under ancestry here) out as the tree, given each
    candidate's parent (`parent_list`, -1 for the root's children). host_tokens: the candidates' tokens and then
    the root's, on the host (the tree keeps them for the acceptance walk); host_probs: the candidates' draft
    probabilities given their parents in fixed point (`_PROB_SCALE`; the tree keeps them and the nodes' kinds for
    the planner, k being the children per parent: a candidate id's remainder by k is its rank among its siblings).

    A tree holds tens of nodes: its layout is worked out on the host from two short lists, in a handful of kernels
    instead of one pass per depth."""
    device = tokens.device
    kept = set(kept_list)
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
    tree = DraftTree(tree_tokens, parent_of, node_depths, _ancestor_mask(parent_of, device))
    if host_tokens is not None:
        tree.token_list = host_tokens[-1:] + [host_tokens[c] for c in order]
    if host_probs:
        tree.node_probs = [host_probs[c] / _PROB_SCALE for c in order]
        tree.node_kinds = [SIBLING if c % k else FIRST for c in order]
    return tree


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
