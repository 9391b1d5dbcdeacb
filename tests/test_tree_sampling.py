"""Recursive rejection sampling down a sampled draft tree emits exactly the target's distribution."""

from __future__ import annotations

import torch
from transformers import LogitsProcessorList

from specvlm_hf.generation.acceptance import Selector, accept_sampled
from specvlm_hf.generation.tree_policy import DraftTree, draw_without_replacement, sibling_counts

V = 5
# target logits of the next token given the previous token (row = previous token; row V = the root's context)
P_LOGITS = torch.tensor(
    [
        [2.0, 1.5, 1.0, 0.2, -1.0],
        [0.0, 0.3, 2.5, 0.1, 1.0],
        [1.0, 1.0, 1.0, 1.0, 1.0],
        [-1.0, 2.0, 0.0, 2.0, 0.5],
        [0.5, -0.5, 1.5, 0.0, 0.0],
        [1.2, 1.0, 0.8, -0.3, 0.9],
    ]
)
# the draft's (deliberately different) logits, same layout; one token it never proposes after the root
Q_LOGITS = torch.tensor(
    [
        [0.0, 2.0, 1.8, -0.5, 1.0],
        [1.0, 0.3, 0.5, 0.1, 2.0],
        [2.0, 0.0, 1.0, 1.0, -1.0],
        [0.0, 0.0, 0.0, 3.0, 0.5],
        [0.5, 1.5, -0.5, 0.0, 1.0],
        [0.0, 2.5, 1.0, float("-inf"), 1.5],
    ]
)


def _draw_tree(k: int) -> DraftTree:
    """Root with k children drawn without replacement from q; each child with k children of its own."""
    logq_root = torch.log_softmax(Q_LOGITS[V], dim=-1)
    level1 = draw_without_replacement(logq_root, k).tolist()
    assert all(torch.isfinite(logq_root[t]) for t in level1)
    tokens, parents, child_q = [V], [-1], {0: logq_root.exp()}
    for token in level1:
        tokens.append(token)
        parents.append(0)
    for i, token in enumerate(level1, start=1):
        logq = torch.log_softmax(Q_LOGITS[token], dim=-1)
        child_q[i] = logq.exp()
        for child in draw_without_replacement(logq, k).tolist():
            tokens.append(child)
            parents.append(i)
    n = len(tokens)
    depths = torch.tensor([0] + [1 if p == 0 else 2 for p in parents[1:]])
    return DraftTree(torch.tensor(tokens), parents, depths, torch.eye(n, dtype=torch.bool), child_q, None)


def _joint_counts(k: int, n_trials: int) -> torch.Tensor:
    select = Selector(LogitsProcessorList(), do_sample=True)
    counts = torch.zeros(V, V + 1)  # first token x second token (column V: no second token drawn this step)
    prefix = torch.tensor([[0]])
    for _ in range(n_trials):
        tree = _draw_tree(k)
        logits = P_LOGITS[tree.tokens]  # each node's target logits depend on its own token
        path, emitted = accept_sampled(tree, logits, prefix, select)
        assert len(emitted) == len(path)
        counts[emitted[0], emitted[1] if len(emitted) > 1 else V] += 1
    return counts


def test_recursive_rejection_sampling_is_exact():
    torch.manual_seed(0)
    p_first = torch.softmax(P_LOGITS[V], dim=-1)
    p_second = torch.softmax(P_LOGITS[:V], dim=-1)  # (first, second)
    n = 12000
    for k in (1, 2, 3):
        counts = _joint_counts(k, n)
        first = counts.sum(1) / n
        tv_first = 0.5 * (first - p_first).abs().sum()
        # when the first token was accepted from the tree, the second token follows p(. | first)
        accepted_second = counts[:, :V]
        rows = accepted_second.sum(1, keepdim=True)
        conditional = accepted_second / rows.clamp_min(1)
        tv_second = 0.5 * ((conditional - p_second).abs().sum(1) * rows[:, 0]).sum() / rows.sum()
        # sampling noise at n=12000 over 5 outcomes is about 0.007; a biased rule moves these past 0.05
        assert tv_first < 0.02, (k, tv_first, first, p_first)
        assert tv_second < 0.03, (k, tv_second)
        # the draft really was used: the first token came from the tree in most steps
        assert rows.sum() / n > 0.4, k


def test_sibling_counts_fill_shallow_levels_first():
    assert sibling_counts(4, 0, 3) == [0, 0, 0, 0]
    assert sibling_counts(4, 3, 3) == [1, 1, 1, 0]
    assert sibling_counts(3, 5, 3) == [2, 2, 1]
    assert sibling_counts(2, 9, 2) == [2, 2]  # at most max_per_level extra children per level


def test_draw_without_replacement_is_a_uniform_sample_order():
    """First draw ~ q; the second draw given the first ~ q without it (checked on the pair distribution)."""
    torch.manual_seed(0)
    q = torch.tensor([0.5, 0.3, 0.2, 0.0])
    n = 20000
    pairs = torch.zeros(4, 4)
    for _ in range(n):
        drawn = draw_without_replacement(q.log(), 3).tolist()
        assert 3 not in drawn and len(set(drawn)) == len(drawn) == 3  # q = 0 never drawn, no repeats
        pairs[drawn[0], drawn[1]] += 1
    expected = q[:, None] * q[None, :] / (1 - q[:, None])
    expected.fill_diagonal_(0.0)
    assert 0.5 * (pairs / n - expected).abs().sum() < 0.02


def test_draws_never_return_zero_probability_columns():
    logp = torch.log_softmax(torch.tensor([0.0, float("-inf"), 1.0, float("-inf"), -1.0]), dim=-1)
    torch.manual_seed(0)
    for _ in range(200):
        many = draw_without_replacement(logp, 4).tolist()
        assert sorted(many) == [0, 2, 4]  # only the three columns with q > 0, each once
        assert draw_without_replacement(logp, 1).tolist()[0] in (0, 2, 4)
