"""How the bench runs one decoding method: the methods, one timed `generate` call, per-method accumulation.

Shared by `bench.py` (the side-by-side benchmark) and `tuning.py` (budget search).
"""

from __future__ import annotations

import time
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


def default_methods(
    drafts: dict[str, Any], assistant=None, prompt_lookup_num_tokens: int = 10, only=None
) -> list[Method]:
    methods = [Method("plain", "plain")]
    if assistant is not None:
        methods.append(Method("assisted", "assisted", assistant=assistant))
    else:
        methods.append(
            Method("assisted", "skip", note="no independent small draft with the target's tokenizer")
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
    if only:
        wanted = set(only) | {"plain"}
        methods = [m for m in methods if m.name.split("[")[0].split("(")[0] in wanted]
    return methods


# ---------------------------------------------------------------------------------------------- helpers


class _ForwardCounter:
    """Counts forwards of the target (a forward pre-hook)."""

    def __init__(self, model):
        self.count = 0
        self._handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.count += 1

    def remove(self) -> None:
        self._handle.remove()


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
    return model.generate(**inputs, **kwargs)


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

    def call(
        self, model, inputs, max_new_tokens: int, temperature: float, counter, warm: bool = False
    ) -> None:
        if self.method.kind == "skip" or self.error is not None:
            return
        try:
            counter.count = 0
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
        if self.method.kind == "spec":
            stats = self.method.draft.last_generation_stats
            self.accepted += list(stats.accepted_lengths)
            self.draft_s += stats.draft_time_s
            self.verify_s += stats.verify_time_s
            self.spec_prefill_s += stats.prefill_time_s
            self.draft_prefill_s += stats.draft_prefill_time_s
            self.have_verify = self.have_verify and stats.verify_time_s > 0

    def record(self, temperature: float, n_prompts: int, max_new_tokens: int) -> dict:
        method = self.method
        record: dict[str, Any] = {
            "method": method.name,
            "temperature": float(temperature),
            "status": "ok",
            "note": method.note,
            "prompts": n_prompts,
            "max_new_tokens": max_new_tokens,
        }
        if method.draft is not None:
            record["compressor_mode"] = method.draft.config.compressor_mode
            record["decoding_mode"] = method.decoding_mode
            if method.decoding_mode == "tree":
                overrides = method.sampling_kwargs if temperature > 0 else {}
                settings = DecodingSettings.from_config(method.draft.config, **overrides)
                record["tree"] = {
                    "total_tokens": settings.tree_total_tokens,
                    "depth": settings.tree_depth,
                    "top_k": settings.tree_top_k,
                    "shape": "sampled spine + siblings" if temperature > 0 else "greedy dynamic tree",
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
        return record
