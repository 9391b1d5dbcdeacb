"""Laying kept draft candidates out as a tree (`tree_policy._select_tree`): order, parents, depths, ancestor mask."""

from __future__ import annotations

import torch

from specvlm_hf.generation.tree_policy import _best_candidates, _select_tree

# candidates: 0,1 at depth 1 (root's children); 2,3 children of 0; 4 child of 1; 5 child of 2; 6 child of 5
PARENTS = torch.tensor([-1, -1, 0, 0, 1, 2, 5])
DEPTHS = torch.tensor([1, 1, 2, 2, 2, 3, 4])
TOKENS = torch.tensor([10, 11, 12, 13, 14, 15, 16])


def _brute_ancestors(parent_of: list[int]) -> torch.Tensor:
    n = len(parent_of)
    anc = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        j = i
        while j >= 0:
            anc[i, j] = True
            j = parent_of[j]
    return anc


def test_tree_layout_parents_depths_and_ancestors():
    keep = torch.tensor([True, True, True, False, True, True, True])
    tree = _select_tree(torch.tensor(9), TOKENS, PARENTS.tolist(), DEPTHS, keep.nonzero().flatten().tolist())
    assert tree.tokens.tolist() == [9, 10, 11, 12, 14, 15, 16]
    assert tree.parents == [-1, 0, 0, 1, 2, 3, 5]
    assert tree.depths.tolist() == [0, 1, 1, 2, 2, 3, 4]
    assert torch.equal(tree.ancestors, _brute_ancestors(tree.parents))


def test_kept_nodes_bring_their_ancestors():
    # only the deepest candidate kept (as exact score ties can leave it): its whole ancestry joins the tree
    keep = torch.zeros(7, dtype=torch.bool)
    keep[6] = True
    tree = _select_tree(torch.tensor(9), TOKENS, PARENTS.tolist(), DEPTHS, keep.nonzero().flatten().tolist())
    assert tree.tokens.tolist() == [9, 10, 12, 15, 16]
    assert tree.parents == [-1, 0, 1, 2, 3]
    assert torch.equal(tree.ancestors, _brute_ancestors(tree.parents))


def test_best_candidates_rank_parents_before_children():
    scores = torch.tensor([-0.1, -2.0, -0.1, -0.5, -2.5, -0.1, -0.1])  # log-probs of 1.0 below candidate 0
    keep = _best_candidates(scores, DEPTHS, 3)
    assert keep.tolist() == [True, False, True, False, False, True, False]


def test_trees_built_by_a_real_draft_have_consistent_ancestry():
    from transformers.cache_utils import DynamicCache

    from specvlm_hf.generation.tree_policy import build_sampled_tree, build_tree
    from specvlm_hf.toy.drafts import new_draft
    from tiny_models import make_tiny_target

    target = make_tiny_target("llava")
    draft = new_draft(target).eval()
    h = draft.config.hidden_size
    torch.manual_seed(0)
    with torch.no_grad():
        for budget in ((10, 4, 3), (16, 16, 3)):
            settings = draft.decoding_settings(
                tree_total_tokens=budget[0], tree_depth=budget[1], tree_top_k=budget[2]
            )
            for build in (build_tree, build_sampled_tree):
                cache = DynamicCache()
                draft(
                    inputs_embeds=torch.randn(1, 5, h),
                    hidden_states=torch.randn(1, 5, h),
                    past_key_values=cache,
                )
                extra = (1.0,) if build is build_sampled_tree else ()
                tree = build(draft, cache, torch.randn(1, 1, h), torch.tensor([3]), 5, settings, *extra)
                assert tree.tokens.shape[0] == len(tree.parents) <= budget[0] + 1
                assert torch.equal(tree.ancestors, _brute_ancestors(tree.parents))
                depth = [0]
                for p in tree.parents[1:]:
                    depth.append(depth[p] + 1)
                assert tree.depths.tolist() == depth


def test_best_candidates_per_sequence_of_a_batch():
    scores = torch.tensor(
        [[-0.1, -2.0, -0.1, -0.5, -2.5, -0.1, -0.1], [-2.0, -0.1, -2.5, -2.6, -0.2, -3.0, -3.1]]
    )
    keep = _best_candidates(scores, DEPTHS, 2)
    assert keep.tolist()[0] == [True, False, True, False, False, False, False]
    assert keep.tolist()[1] == [False, True, False, False, True, False, False]
