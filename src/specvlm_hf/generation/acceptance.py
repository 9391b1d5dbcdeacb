"""Choosing tokens from the target's logits exactly as plain generate does, and the acceptance walks of a verified
draft tree (`tree.py`'s module docstring, step 4): greedy descent, recursive rejection sampling."""

from __future__ import annotations

import copy

import torch
from transformers.generation import logits_process
from transformers.generation.logits_process import LogitsProcessorList

from .tree_policy import DraftTree


class Selector:
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

    def for_row(self, row: int, batch_size: int) -> Selector:
        """The choice for row `row` of a batch of `batch_size` prompts, exactly as plain batched generate makes it."""
        return _RowSelector(self.logits_processor, self.do_sample, row, batch_size)


# transformers' processors that treat every row of a batch alike (a function of that row's ids and scores), given
# the row's slice of any per-row state they hold (`_row_processors`)
_ROW_INDEPENDENT = tuple(
    getattr(logits_process, name)
    for name in (
        "TemperatureLogitsWarper",
        "TopKLogitsWarper",
        "TopPLogitsWarper",
        "MinPLogitsWarper",
        "TypicalLogitsWarper",
        "EpsilonLogitsWarper",
        "EtaLogitsWarper",
        "TopHLogitsWarper",
        "RepetitionPenaltyLogitsProcessor",
        "NoRepeatNGramLogitsProcessor",
        "MinLengthLogitsProcessor",
        "MinNewTokensLengthLogitsProcessor",
        "SuppressTokensLogitsProcessor",
        "SuppressTokensAtBeginLogitsProcessor",
        "NoBadWordsLogitsProcessor",
        "SequenceBiasLogitsProcessor",
        "ForcedBOSTokenLogitsProcessor",
        "ForcedEOSTokenLogitsProcessor",
        "ExponentialDecayLengthPenalty",
        "InfNanRemoveLogitsProcessor",
        "LogitNormalization",
    )
    if hasattr(logits_process, name)
)


def _row_processors(logits_processor, row: int) -> LogitsProcessorList | None:
    """The processors for row `row` of a batch run on that row alone, or None when one of them may depend on the
    row's index or hold state we cannot slice (a prefix constraint's batch index, a custom processor)."""
    out = []
    for processor in logits_processor:
        if type(processor) not in _ROW_INDEPENDENT:
            return None
        ignore = getattr(processor, "prompt_ignore_length", None)
        if isinstance(ignore, torch.Tensor):  # a repetition penalty's per-row prompt length
            processor = copy.copy(processor)
            processor.prompt_ignore_length = ignore[row : row + 1]
        out.append(processor)
    return LogitsProcessorList(out)


class _RowSelector(Selector):
    """One row of a batch. Row-independent processors run on the row alone; otherwise (a prefix constraint's batch
    index, a custom processor) the processors see the batch's shape with this row at its own index, the other rows
    repeating it and discarded."""

    def __init__(self, logits_processor, do_sample: bool, row: int, batch_size: int):
        super().__init__(logits_processor, do_sample)
        self.row, self.batch_size = row, batch_size
        self.row_processors = _row_processors(logits_processor, row)

    def scores(self, prefix_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        scores = logits[None].float()
        if len(self.logits_processor) == 0:
            return scores
        if self.row_processors is not None:
            return self.row_processors(prefix_ids, scores)
        rows = self.batch_size
        batch_scores = self.logits_processor(prefix_ids.expand(rows, -1), scores.expand(rows, -1).clone())
        return batch_scores[self.row : self.row + 1]


def _host_tokens(tree: DraftTree) -> list[int]:
    """The tree's tokens on the host: kept by the tree builder where it read them anyway; a lone root (a plain
    step) needs none (it has no children to look up)."""
    if tree.token_list is not None:
        return tree.token_list
    return tree.tokens.tolist() if len(tree.parents) > 1 else [-1]


def accept_greedy(
    tree: DraftTree, logits: torch.Tensor, prefix: torch.Tensor, select, choices: list[int] | None = None
) -> tuple[list, list]:
    """Greedy walk: descend while a child carries the target's choice y. Returns (path, emitted tokens).

    choices: every node's argmax when the caller has them (greedy, no logits processors); else each visited node's
    choice is made by `select`, which applies the processors to the prefix so far and samples when sampling (a plain
    step's lone root while sampling comes here). Greedy without processors reads all choices in one transfer here."""
    children: dict[tuple[int, int], int] = {}
    tree_tokens = _host_tokens(tree)
    for i in range(1, len(tree_tokens)):
        children.setdefault((tree.parents[i], tree_tokens[i]), i)
    if choices is None and not select.do_sample and len(select.logits_processor) == 0:
        choices = logits.argmax(-1).tolist()
    path, emitted, node = [0], [], 0
    while True:
        token = select(prefix, logits[node]) if choices is None else choices[node]
        emitted.append(token)
        child = children.get((node, token))
        if child is None:
            return path, emitted
        path.append(child)
        node = child
        prefix = torch.cat([prefix, tree.tokens[child].view(1, 1)], dim=1)


def accept_sampled(
    tree: DraftTree, logits: torch.Tensor, prefix: torch.Tensor, selector: Selector
) -> tuple[list, list]:
    """Recursive rejection sampling down a sampled tree (module docstring). Returns (path, emitted tokens).

    logits: (n, V) raw target logits of the tree nodes; every emitted token has the target's distribution."""
    kids: list[list[int]] = [[] for _ in tree.parents]
    for i, parent in enumerate(tree.parents[1:], start=1):
        kids[parent].append(i)  # ascending tree index = draw order among siblings
    tree_tokens = _host_tokens(tree)
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
