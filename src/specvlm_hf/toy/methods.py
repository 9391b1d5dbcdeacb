"""How the bench runs one decoding method: the methods, one timed `generate` call, per-method accumulation.

Shared by `bench.py` (the side-by-side benchmark) and `tuning.py` (budget search).
"""

from __future__ import annotations

import itertools
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import hf_private
from ..generation.settings import DecodingSettings
from ..targets import families


@dataclass
class Method:
    """One decoding method: how to call ``generate`` for it."""

    name: str
    kind: str  # "plain" | "assisted" | "prompt_lookup" | "spec"
    draft: Any = None
    assistant: Any = None
    decoding_mode: str | None = None
    gen_kwargs: dict = field(default_factory=dict)
    sampling_kwargs: dict = field(default_factory=dict)  # extra generate() kwargs at temperature > 0 only
    note: str = ""
    budget: str | None = None  # an explicit decoding budget (`--sweep`), e.g. "chain k=4 conf=0.4"
    assistant_sees_images: bool = (
        False  # give the assistant the prompt's pixel values (`assistant_sees_images`)
    )


def spec_methods(drafts: dict[str, Any], modes=("chain", "tree")) -> list[Method]:
    """EagleVLM / SpecVLM methods for each draft (label -> bound draft), chain and tree."""
    methods = []
    for label, draft in drafts.items():
        compressor = draft.config.compressor_mode
        base = "eagle" if compressor is None else "specvlm"
        for mode in modes:
            name = f"{base}_{mode}" if compressor is None else f"{base}_{mode}[{compressor}]"
            if len(drafts) > 1 and sum(d.config.compressor_mode == compressor for d in drafts.values()) > 1:
                name += f"({label})"
            methods.append(Method(name, "spec", draft=draft, decoding_mode=mode))
    return methods


# `specvlm bench --sweep`: fixed budgets, each passed explicitly per call
SWEEP_CHAIN_LENGTHS = (2, 3, 4, 6, 8)
SWEEP_CONFIDENCE = (0.0, 0.4)
SWEEP_TREES = ((6, 4, 2), (8, 5, 2), (12, 6, 2), (16, 8, 2))  # (tree_total_tokens, tree_depth, tree_top_k)


def sweep_methods(drafts: dict[str, Any]) -> list[Method]:
    """Every draft's chain and tree methods at fixed budgets (explicit per-call overrides), named ``base@budget``."""
    methods = []
    for base in spec_methods(drafts):
        if base.decoding_mode == "chain":
            for k, conf in itertools.product(SWEEP_CHAIN_LENGTHS, SWEEP_CONFIDENCE):
                methods.append(
                    Method(
                        f"{base.name}@k{k}/c{conf:g}",
                        "spec",
                        draft=base.draft,
                        decoding_mode="chain",
                        gen_kwargs={"num_draft_tokens": k, "draft_confidence_threshold": conf},
                        budget=f"chain k={k} conf={conf:g}",
                    )
                )
        else:
            for total, depth, top_k in SWEEP_TREES:
                methods.append(
                    Method(
                        f"{base.name}@{total}/{depth}/{top_k}",
                        "spec",
                        draft=base.draft,
                        decoding_mode="tree",
                        gen_kwargs={"tree_total_tokens": total, "tree_depth": depth, "tree_top_k": top_k},
                        budget=f"tree {total}/{depth}/{top_k}",
                    )
                )
    return methods


def untrained_draft(train_target, vlm, toy_medium: bool, seed: int):
    """A randomly initialised EagleVLM draft for ``vlm`` (built at the training target's width and widened with
    it for the medium toy target, as the trained drafts are), bound to ``vlm``."""
    from .demo import widen_draft_for_timing
    from .drafts import new_draft

    draft = new_draft(train_target, seed=seed).eval()
    if toy_medium:
        return widen_draft_for_timing(draft, vlm)
    return draft.to(next(vlm.parameters()).dtype).bind(vlm)


def untrained_methods(draft) -> list[Method]:
    """An untrained (randomly initialised) draft in chain and tree mode at default settings: the floor the
    automatic back-off keeps (issue: never below 0.95x plain)."""
    note = "untrained draft (random init): the automatic budget's back-off floor"
    return [
        Method(f"untrained_{mode}", "spec", draft=draft, decoding_mode=mode, note=note)
        for mode in ("chain", "tree")
    ]


def base_name(name: str) -> str:
    """``specvlm_tree[pool]@16/8/2`` -> ``specvlm_tree`` (what ``--methods`` selects)."""
    return name.split("@")[0].split("[")[0].split("(")[0]


def default_methods(
    drafts: dict[str, Any],
    assistant=None,
    prompt_lookup_num_tokens: int = 10,
    only=None,
    peer=None,
    sweep: bool = False,
    untrained=None,
) -> list[Method]:
    """plain, assisted, assisted_peer (when given), prompt_lookup, the drafts' chain and tree methods at their
    default settings, an ``untrained`` draft's (when given) and, with ``sweep``, every draft at every fixed budget
    of `sweep_methods` (interleaved in one run)."""
    methods = [Method("plain", "plain")]
    if assistant is not None:
        methods.append(Method("assisted", "assisted", assistant=assistant))
    else:
        methods.append(
            Method("assisted", "skip", note="no independent small draft with the target's tokenizer")
        )
    if peer is not None:
        methods.append(
            Method(
                "assisted_peer",
                "assisted",
                assistant=peer,
                assistant_sees_images=True,
                note="1-layer target-initialised LLaVA distilled like our draft; sees the image",
            )
        )
    methods.append(
        Method(
            "prompt_lookup",
            "prompt_lookup",
            gen_kwargs={"prompt_lookup_num_tokens": prompt_lookup_num_tokens},
            note="candidates cut at <image> placeholders (lossless workaround)",
        )
    )
    methods += spec_methods(drafts)
    if untrained is not None:
        methods += untrained_methods(untrained)
    if sweep:
        methods += sweep_methods(drafts)
    if only:
        wanted = set(only) | {"plain"}
        methods = [m for m in methods if base_name(m.name) in wanted]
    return methods


# ---------------------------------------------------------------------------------------------- helpers


class _ForwardCounter:
    """Counts and times the forwards of a model (forward pre/post hooks) since the last `reset`.

    ``time_s``: wall time inside its forwards; ``first_s``: that of the first one (the prefill in a `generate`)."""

    def __init__(self, model):
        self.reset()
        self._handles = [model.register_forward_pre_hook(self._pre), model.register_forward_hook(self._post)]

    def reset(self) -> None:
        self.count, self.time_s, self.first_s, self._start = 0, 0.0, 0.0, None

    def _pre(self, module, args):
        self.count += 1
        self._start = time.perf_counter()

    def _post(self, module, args, output):
        if self._start is None:
            return
        elapsed, self._start = time.perf_counter() - self._start, None
        self.time_s += elapsed
        if self.count == 1:
            self.first_s = elapsed

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@contextmanager
def _counting(model):
    counter = _ForwardCounter(model)
    try:
        yield counter
    finally:
        counter.remove()


def _image_token_ids(model) -> list[int]:
    try:
        return list(families.image_token_ids(families.unwrap_target(model)))
    except Exception:  # noqa: BLE001 - a plain causal LM has none
        ids = [getattr(model.config, k, None) for k in ("image_token_id", "image_token_index")]
        return [i for i in ids if i is not None]


def prompt_lookup_without_placeholders(model, banned_ids: list[int]):
    """Truncate prompt-lookup candidates at the first visual placeholder token (lossless: fewer proposals)."""
    from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

    banned = torch.tensor(sorted(set(banned_ids)), dtype=torch.long)

    def wrap(generator):
        if isinstance(generator, PromptLookupCandidateGenerator) and banned.numel():
            inner = generator.get_candidates

            def get_candidates(input_ids, **kw):
                candidates, logits = inner(input_ids, **kw)
                n = input_ids.shape[1]
                hits = torch.isin(candidates[0, n:], banned.to(candidates.device)).nonzero()
                if hits.numel():
                    candidates = candidates[:, : n + int(hits[0])]
                return candidates, logits

            generator.get_candidates = get_candidates
        return generator

    return hf_private.wrap_candidate_generator(model, wrap)


def _sampling_kwargs(temperature: float) -> dict:
    if temperature <= 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}


def _generate(model, method: Method, inputs: dict, max_new_tokens: int, temperature: float):
    kwargs = {"max_new_tokens": max_new_tokens, **_sampling_kwargs(temperature), **method.gen_kwargs}
    if temperature > 0:
        kwargs.update(method.sampling_kwargs)
    if method.kind == "assisted":
        kwargs["assistant_model"] = method.assistant
    elif method.kind == "spec":
        kwargs["assistant_model"] = method.draft
        kwargs["decoding_mode"] = method.decoding_mode
    if method.kind == "prompt_lookup":
        with prompt_lookup_without_placeholders(model, _image_token_ids(model)):
            return model.generate(**inputs, **kwargs)
    if method.assistant_sees_images:
        from .peer import prompt_images

        with prompt_images(method.assistant, inputs):
            return model.generate(**inputs, **kwargs)
    return model.generate(**inputs, **kwargs)


FIRST_CALL_PROMPTS = 4  # prompts each method's first call is timed on (`first_calls`)


@dataclass
class FirstCalls:
    """One method's first calls, each against plain generate's call on the same prompt right before it."""

    seconds: list[float] = field(default_factory=list)
    plain_s: list[float] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        """Time over plain's, summed over the prompts (a long answer weighs what it costs)."""
        return sum(self.seconds) / sum(self.plain_s)


def first_calls(
    model, prompts: list[dict], methods: list[Method], max_new_tokens: int, count: int = FIRST_CALL_PROMPTS
) -> dict[str, FirstCalls]:
    """Each method's first greedy call on each of the first `count` prompts, against plain generate's call on it
    right before: {method: FirstCalls}. No warm-up, and what the automatic budget learned is forgotten before each
    of the method's calls (`budget.forget_learned`), so every call pays what a process calling `generate` once
    pays. Plain is paired with itself (its ratio is the measurement's noise). A method with a fixed budget learns
    nothing, so it is timed on the first prompt only."""
    from ..generation.budget import forget_learned

    plain = next((m for m in methods if m.kind == "plain"), None)
    if plain is None:
        return {}

    def timed(method, inputs) -> float:
        start = time.perf_counter()
        out = _generate(model, method, inputs, max_new_tokens, 0.0)
        out.view(-1)[-1:].tolist()  # (waits for a GPU's work)
        return time.perf_counter() - start

    timed(plain, prompts[0])  # the process's own first-forward costs (allocations, kernels) are no method's
    firsts: dict[str, FirstCalls] = {}
    failed: set[str] = set()
    for i, inputs in enumerate(prompts[:count]):
        for method in methods:
            if method.kind == "skip" or method.name in failed or (i > 0 and method.budget is not None):
                continue
            if method.kind == "spec":
                forget_learned(method.draft)
            plain_s = timed(plain, inputs)
            try:
                seconds = timed(method, inputs)
            except Exception:  # noqa: BLE001 - a failing method is reported by the timed run
                failed.add(method.name)
                firsts.pop(method.name, None)
                continue
            calls = firsts.setdefault(method.name, FirstCalls())
            calls.seconds.append(seconds)
            calls.plain_s.append(plain_s)
    return firsts


def _progress(iterable, desc: str, enabled: bool, total: int | None = None):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False)


class _MethodRun:
    """One method's generations at one temperature, accumulated prompt by prompt."""

    def __init__(self, method: Method):
        self.method = method
        self.tokens: list[list[int]] = []
        self.wall = self.draft_s = self.verify_s = self.spec_prefill_s = self.draft_prefill_s = 0.0
        self.new = self.forwards = 0
        self.accepted: list[int] = []
        self.have_verify = True
        self.error: str | None = None
        # from forward hooks, prefill forwards excluded: target / assistant time per later target forward
        self.steps = self.step_tokens = 0
        self.target_step_s = self.assistant_step_s = 0.0
        self.budget_costs_ms: dict[int, float] | None = None

    def call(
        self, model, inputs, max_new_tokens: int, temperature: float, counter, warm: bool = False
    ) -> None:
        if self.method.kind == "skip" or self.error is not None:
            return
        assistant = self.method.assistant if self.method.kind == "assisted" else None
        try:
            counter.reset()
            with _counting(assistant) if assistant is not None else _no_counter() as assistant_counter:
                t0 = time.perf_counter()
                out = _generate(model, self.method, inputs, max_new_tokens, temperature)
                wall = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 - a failing method is a result, not a crash of the benchmark
            self.error = f"{type(exc).__name__}: {exc}"[:500]
            return
        if warm:
            return
        self.wall += wall
        self.forwards += counter.count
        generated = out[0, inputs["input_ids"].shape[1] :].tolist()
        self.tokens.append(generated)
        self.new += len(generated)
        if counter.count > 1:  # the first target forward is the prefill (it gives the first token)
            self.steps += counter.count - 1
            self.step_tokens += len(generated) - 1
            self.target_step_s += counter.time_s - counter.first_s
            if assistant_counter is not None:  # the assistant's first forward is its pass over the prompt
                self.assistant_step_s += assistant_counter.time_s - assistant_counter.first_s
        if self.method.kind == "spec":
            stats = self.method.draft.last_generation_stats
            self.accepted += list(stats.accepted_lengths)
            self.draft_s += stats.draft_time_s
            self.verify_s += stats.verify_time_s
            self.spec_prefill_s += stats.prefill_time_s
            self.draft_prefill_s += stats.draft_prefill_time_s
            self.have_verify = self.have_verify and stats.verify_time_s > 0
            if stats.budget_costs_ms:  # the verify costs c(n) the automatic budget has learned so far
                self.budget_costs_ms = {int(n): round(ms, 3) for n, ms in stats.budget_costs_ms.items()}

    def record(self, temperature: float, n_prompts: int, max_new_tokens: int) -> dict:
        method = self.method
        record: dict[str, Any] = {
            "method": method.name,
            "kind": method.kind,
            "temperature": float(temperature),
            "status": "ok",
            "note": method.note,
            "prompts": n_prompts,
            "max_new_tokens": max_new_tokens,
            "budget": method.budget,
        }
        if self.budget_costs_ms:
            record["budget_costs_ms"] = self.budget_costs_ms
        if method.draft is not None:
            record["compressor_mode"] = method.draft.config.compressor_mode
            record["decoding_mode"] = method.decoding_mode
            overrides = {
                k: v for k, v in method.gen_kwargs.items() if k in DecodingSettings.__dataclass_fields__
            }
            overrides.pop("decoding_mode", None)
            if temperature > 0:
                overrides.update(method.sampling_kwargs)
            if method.decoding_mode == "chain":
                settings = DecodingSettings.from_config(method.draft.config, **overrides)
                record["chain"] = {
                    "num_draft_tokens": settings.num_draft_tokens,
                    "confidence_threshold": settings.draft_confidence_threshold,
                }
            if method.decoding_mode == "tree":
                settings = DecodingSettings.from_config(method.draft.config, **overrides)
                record["tree"] = {
                    "total_tokens": settings.tree_total_tokens,
                    "depth": settings.tree_depth,
                    "top_k": settings.tree_top_k,
                    "shape": (
                        "greedy dynamic tree"
                        if temperature <= 0
                        else "sampled spine + siblings"
                        if method.sampling_kwargs
                        else "sampled tree"
                    ),
                }
        if method.kind == "skip":
            record.update(status="skipped", lossless=None, speedup=None, mean_accepted_length=None)
            record["tokens_per_second"] = None
            return record
        if self.error is not None:
            record.update(status="failed", error=self.error, lossless=None)
            record.update(speedup=None, mean_accepted_length=None, tokens_per_second=None)
            return record
        wall, new, forwards, accepted = self.wall, self.new, self.forwards, self.accepted
        record.update(
            new_tokens=int(new),
            total_time_s=wall,
            tokens_per_second=new / wall if wall else 0.0,
            target_forwards=int(forwards),
            target_forwards_per_token=forwards / new if new else None,
        )
        if method.kind == "spec" and accepted:
            have_verify = self.have_verify
            record["mean_accepted_length"] = sum(accepted) / len(accepted)
            record["draft_time_s"] = self.draft_s
            record["verify_steps"] = len(accepted)
            record["draft_ms_per_step"] = 1000 * self.draft_s / len(accepted)
            record["verify_ms_per_step"] = 1000 * self.verify_s / len(accepted) if have_verify else None
            record["verify_time_s"] = self.verify_s if have_verify else None
            record["draft_prefill_time_s"] = self.draft_prefill_s
            # prefill = the target's and the draft's forwards over the prompt (chain mode: target part not separable)
            record["prefill_time_s"] = self.spec_prefill_s + self.draft_prefill_s if have_verify else None
            accounted = (
                self.draft_s
                + self.draft_prefill_s
                + (self.verify_s + self.spec_prefill_s if have_verify else 0)
            )
            record["other_time_s"] = wall - accounted
        else:
            record["mean_accepted_length"] = new / forwards if forwards else None
            if method.kind == "plain":
                record["draft_time_s"] = 0.0
        mal = record["mean_accepted_length"]
        record["mean_accepted_length_no_bonus"] = mal - 1 if mal is not None else None
        if self.steps:
            # timed by hooks on the target (and the assistant): per target forward after the prefill
            record["tokens_per_step"] = self.step_tokens / self.steps
            record["target_ms_per_step"] = 1000 * self.target_step_s / self.steps
            if method.kind in ("assisted", "prompt_lookup") or (
                method.kind == "spec" and record.get("verify_ms_per_step") is None
            ):
                record["verify_ms_per_step"] = record["target_ms_per_step"]  # chain mode: not in the stats
            if method.kind == "assisted":
                record["draft_ms_per_step"] = 1000 * self.assistant_step_s / self.steps
        return record


@contextmanager
def _no_counter():
    yield None
