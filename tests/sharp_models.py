"""Tiny targets whose greedy output is sensitive to positions and masks (test support, not a test file).

`tiny_models.make_tiny_target` initialises every linear with std 0.02: on a 32-wide decoder each layer then adds
about a tenth of its input to the residual stream, the token embedding dominates, and a position or mask error
of one usually leaves the greedy tokens unchanged (PaliGemma's tied head even makes it repeat one token). Here
the text decoder's linears are redrawn at unit gain (std 1/sqrt(fan_in)), queries and keys at a larger gain so
attention is sharp, and the head (untied from the embedding) at a gain that makes the logits peaked. Then a
position shifted by one changes the continuation within a few tokens for every family (`shifted_generate`
measures that, so a test can assert its cases are able to fail).
"""

from __future__ import annotations

import torch

from specvlm_hf.targets import families as targets
from tiny_models import make_tiny_target

QK_GAIN, LINEAR_GAIN, HEAD_GAIN = 2.0, 1.0, 3.0


def sharpen(model, seed: int = 0):
    """Redraw the text decoder's linear weights and the head in place (see module docstring); returns model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in targets.decoder(model).named_modules():
            if isinstance(module, torch.nn.Linear):
                gain = QK_GAIN if name.endswith(("q_proj", "k_proj")) else LINEAR_GAIN
                fan_in = module.weight.shape[1]
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * gain / fan_in**0.5)
        head = targets.output_embeddings(model)
        if head.weight.data_ptr() == targets.input_embeddings(model).weight.data_ptr():
            head.weight = torch.nn.Parameter(head.weight.detach().clone())  # untie: scale the head only
        fan_in = head.weight.shape[1]
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * HEAD_GAIN / fan_in**0.5)
    return model


def make_sharp_target(family: str, seed: int = 0, attn_implementation: str | None = None):
    model = sharpen(make_tiny_target(family, seed=seed), seed=seed)
    if attn_implementation is not None:
        model.set_attn_implementation(attn_implementation)
    return model


def shifted_generate(model, inputs: dict, max_new_tokens: int, shift: int = 1, **kwargs) -> torch.Tensor:
    """Plain greedy generate with every decode step's positions moved by `shift` relative to the prompt's.

    This is the error a verify forward with off-by-one positions makes; a case whose output does not change under
    it cannot detect such an error."""
    decoder = targets.decoder(model)

    def hook(module, args, kw):
        cache = kw.get("cache", kw.get("past_key_values"))
        if cache is None or cache.get_seq_length() == 0:
            return args, kw
        positions = kw.get("position_ids")
        if positions is None:
            embeds = kw.get("inputs_embeds")
            q = embeds.shape[1] if embeds is not None else kw["input_ids"].shape[1]
            positions = (torch.arange(q) + cache.get_seq_length())[None]
        kw["position_ids"] = positions + shift
        return args, kw

    handle = decoder.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        return model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **kwargs)
    finally:
        handle.remove()
