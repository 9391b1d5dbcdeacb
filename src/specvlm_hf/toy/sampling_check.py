"""Are sampled outputs distributed as the target's? A randomized probability-integral-transform (PIT) test.

Used by the bench for every record at temperature T > 0 (`bench.py`'s docstring states the test and its
false-alarm rate). For each sampled token x_t the target, run once teacher-forced over the prompt and the generated
tokens, gives p_t = softmax(logits_t / T). With the vocabulary ordered by decreasing p_t (ties by token id), F_t the
mass before x_t and V_t ~ U(0, 1) independent, u_t = F_t + V_t * p_t(x_t). If every token was drawn from the
target's distribution given its prefix -- what a lossless method guarantees -- the u_t of all tokens of all
prompts are i.i.d. U(0, 1) (the Rosenblatt transform of a sequential sample); a Kolmogorov-Smirnov test of the u_t
against U(0, 1) gives the p-value. A method that over-produces likely tokens (e.g. a draft's argmax leaking
through) shifts the u_t towards 0. Every generated token counts, so the check reuses the run's generations and costs
one target forward per (prompt, method); the first new token alone would test nothing, since it is the target's
own sample from the prefill in every method.
"""

from __future__ import annotations

import math

import torch

TEST_NAME = "randomized PIT + Kolmogorov-Smirnov vs U(0,1)"


def ks_uniform_p_value(u: torch.Tensor) -> tuple[float, float]:
    """(D, p): the Kolmogorov-Smirnov statistic of samples ``u`` against U(0, 1) and its asymptotic p-value.

    p from the Kolmogorov distribution with Stephens' small-sample correction
    lambda = (sqrt(n) + 0.12 + 0.11 / sqrt(n)) * D (accurate to about 1e-3 in p for n >= 30)."""
    n = u.numel()
    if n == 0:
        return float("nan"), float("nan")
    x = torch.sort(u.double().flatten()).values
    i = torch.arange(1, n + 1, dtype=torch.float64)
    d = float(torch.maximum(i / n - x, x - (i - 1) / n).max())
    lam = (math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n)) * d
    if lam < 0.2:
        return d, 1.0
    p = 2 * sum((-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam) for k in range(1, 101))
    return d, min(1.0, max(0.0, p))


def pit_values(logits: torch.Tensor, tokens: torch.Tensor, temperature: float, generator) -> torch.Tensor:
    """u_t for tokens (n,) given the target's logits (n, V) at their positions (see the module docstring)."""
    p = torch.softmax(logits.float() / temperature, dim=-1)  # (n, V)
    px = p.gather(1, tokens[:, None])  # (n, 1)
    ids = torch.arange(p.shape[1], device=p.device)[None]  # (1, V)
    before = (p > px) | (
        (p == px) & (ids < tokens[:, None])
    )  # ranked before x_t: more likely, or tied, lower id
    mass = (p * before).sum(-1)  # F_t
    v = torch.rand(tokens.shape[0], generator=generator, dtype=torch.float64)
    return (mass.double().cpu() + v * px[:, 0].double().cpu()).clamp(0.0, 1.0)


@torch.no_grad()
def sampling_check(
    model, prompts: list[dict], tokens: list[list[int]], temperature: float, seed: int = 0
) -> dict:
    """The sampled-output fields of a record: test name, tokens tested, KS statistic and p-value.

    Assumes plain temperature sampling (the bench passes ``top_k=0, top_p=1``, no other logits processors)."""
    generator = torch.Generator().manual_seed(seed)
    values = []
    for inputs, generated in zip(prompts, tokens):
        if not generated:
            continue
        ids = inputs["input_ids"]
        n = ids.shape[1]
        full = torch.cat([ids, ids.new_tensor([generated[:-1]]).view(1, -1)], dim=1)
        forward_inputs = {**inputs, "input_ids": full}
        if "attention_mask" in inputs:
            forward_inputs["attention_mask"] = torch.ones_like(full)
        logits = model(**forward_inputs).logits[0, n - 1 :]  # (len(generated), V): row j scores new token j
        values.append(
            pit_values(logits, torch.tensor(generated, device=logits.device), temperature, generator)
        )
    u = torch.cat(values) if values else torch.zeros(0, dtype=torch.float64)
    d, p = ks_uniform_p_value(u)
    return {
        "sampling_test": TEST_NAME,
        "sampling_tokens": int(u.numel()),
        "sampling_ks": d,
        "sampling_p_value": p,
    }
