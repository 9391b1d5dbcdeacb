"""The fair assisted peer: an independent one-layer VLM draft for transformers' assisted generation.

`specvlm bench` compares the EagleVLM/SpecVLM drafts with ``assisted_peer``: transformers' own assisted generation
(``generate(assistant_model=peer)``) with a draft model that gets the same budget as ours:

* architecture: the target's class (a ``LlavaForConditionalGeneration``) with ONE decoder layer at the target's
  residual width, the target's tokenizer, vision tower, projector, embedding and ``lm_head`` (copied, frozen: our
  draft shares the target's embedding and ``lm_head`` frozen too). Its decoder layer has the attention of our
  draft's layer (the target's heads) and an MLP sized so that its trainable parameters (decoder layer + final
  norm) equal our EagleVLM draft's (fusion ``fc`` + decoder layer + norms) at the width it is timed at
  (`peer_intermediate_size`): the same parameter count and the same matmul work per drafted token;
* initialisation: from the target (its first decoder layer and final norm; the MLP units beyond the target's get
  the default init and a zero ``down_proj`` column, so the peer starts as a one-layer truncation of the target);
* training (`train_peer`): plain next-token distillation -- soft cross-entropy to the target's next-token
  distribution (KL up to a constant), on response tokens -- from the same frozen target, on the same toy rows, for
  the same steps / batch size / learning rate / schedule / time limit as our draft (`toy.drafts.distill_draft`);
* medium toy target: trained at the tiny target's width against the tiny target (as our drafts are), then widened
  exactly with the same construction (`toy.widen.widen_toy_target`: zero-padded residual width, rescaled norms; its
  heads and MLP keep their size, as `widen_draft` keeps our draft's), so both drafts are trained on the same
  teacher for the same steps and are timed at the same width;
* images: transformers 5.x hands an assistant neither ``pixel_values`` nor the target's encoded images (a stock
  VLM assistant drafts blind), so the peer is a `SpecVLMToyPeer` (a ``LlavaForConditionalGeneration`` whose prefill
  takes the prompt's images from `prompt_images`) and sees the image as it did in training: our draft sees it
  through the target's features, the peer through its own copy of the target's vision tower and projector.
"""

from __future__ import annotations

import copy
import inspect
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import LlavaForConditionalGeneration

# copied from the target and frozen: our draft shares the target's embedding and lm_head, frozen, and has no vision
# part of its own
FROZEN_PARTS = ("vision_tower", "multi_modal_projector", "embed_tokens", "lm_head")


class SpecVLMToyPeer(LlavaForConditionalGeneration):
    """A LLaVA whose forward uses the prompt's images (`prompt_images`) when the generate loop passes none.

    transformers' assisted generation gives an assistant neither ``pixel_values`` nor the target's encoded images;
    in the forward whose ``input_ids`` hold the image placeholders (the assistant's prefill) this model takes the
    ``pixel_values`` set by `prompt_images`; later forwards see the image through its cache. Otherwise a LLaVA.
    """

    prompt_images: dict | None = None

    def forward(self, input_ids=None, pixel_values=None, *args, **kwargs):
        images = self.prompt_images
        if (
            images
            and pixel_values is None
            and not kwargs.get("mm_encoder_outputs")
            and input_ids is not None
            and bool((input_ids == self.config.image_token_id).any())
        ):
            pixel_values = images["pixel_values"]
            kwargs.update({k: v for k, v in images.items() if k != "pixel_values"})
        return super().forward(input_ids, pixel_values, *args, **kwargs)

    # generate() reads the forward's parameters (logits_to_keep, mm_encoder_outputs, ...): keep LLaVA's
    forward.__signature__ = inspect.signature(LlavaForConditionalGeneration.forward)


@contextmanager
def prompt_images(peer, inputs: dict):
    """Let a `SpecVLMToyPeer` see ``inputs``' images during one ``generate`` call."""
    peer.prompt_images = {k: inputs[k] for k in ("pixel_values", "image_sizes") if inputs.get(k) is not None}
    try:
        yield peer
    finally:
        peer.prompt_images = None


def peer_intermediate_size(draft_parameters: int, text_config, hidden: int | None = None) -> int:
    """MLP width that gives a one-layer peer ``draft_parameters`` trainable parameters at width ``hidden``.

    The peer's trainable parameters are its decoder layer (attention of ``text_config``'s heads, an MLP of
    3 * hidden * intermediate) and its three RMSNorm weights (two in the layer, the final norm).
    """
    hidden = hidden or text_config.hidden_size
    head_dim = (
        getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    )
    kv = text_config.num_key_value_heads or text_config.num_attention_heads
    attention = hidden * head_dim * (2 * text_config.num_attention_heads + 2 * kv)
    return max(1, round((draft_parameters - attention - 3 * hidden) / (3 * hidden)))


@torch.no_grad()
def new_peer(target, intermediate_size: int | None = None, seed: int = 0):
    """A one-decoder-layer copy of a LLaVA-style ``target`` (see the module docstring); frozen parts marked."""
    torch.manual_seed(seed)
    config = target.config.__class__.from_dict(target.config.to_dict())
    text = config.get_text_config()
    base = text.intermediate_size
    text.num_hidden_layers = 1
    text.intermediate_size = intermediate_size or base
    config.name_or_path = "specvlm-toy-assisted-peer"
    peer = SpecVLMToyPeer(config).to(next(target.parameters()).dtype).eval()
    peer.generation_config = copy.deepcopy(target.generation_config)
    peer.model.vision_tower.load_state_dict(target.model.vision_tower.state_dict())
    peer.model.multi_modal_projector.load_state_dict(target.model.multi_modal_projector.state_dict())
    src_lm, dst_lm = target.model.language_model, peer.model.language_model
    dst_lm.embed_tokens.weight.copy_(src_lm.embed_tokens.weight)
    peer.lm_head.weight.copy_(target.lm_head.weight)
    dst_lm.norm.weight.copy_(src_lm.norm.weight)
    src, dst = src_lm.layers[0], dst_lm.layers[0]
    for norm in ("input_layernorm", "post_attention_layernorm"):
        getattr(dst, norm).weight.copy_(getattr(src, norm).weight)
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        getattr(dst.self_attn, proj).load_state_dict(getattr(src.self_attn, proj).state_dict())
    n = min(base, text.intermediate_size)
    for proj in ("gate_proj", "up_proj"):
        getattr(dst.mlp, proj).weight[:n] = getattr(src.mlp, proj).weight[:n]
    dst.mlp.down_proj.weight.zero_()
    dst.mlp.down_proj.weight[:, :n] = src.mlp.down_proj.weight[:, :n]
    for name, p in peer.named_parameters():
        p.requires_grad_(not any(part in name for part in FROZEN_PARTS))
    return peer


def peer_trainable_parameters(peer) -> int:
    """Parameters the peer trains (its decoder layer and final norm), whether or not it is frozen now."""
    return sum(
        p.numel() for name, p in peer.named_parameters() if not any(part in name for part in FROZEN_PARTS)
    )


def peer_distillation_loss(peer, target, batch: dict) -> tuple[torch.Tensor, float]:
    """Soft cross-entropy of the peer's next-token distribution to the target's, on response tokens.

    batch: the target's inputs plus ``response_mask`` (B, L) (`SpecVLMDataCollator`). Position t predicts token
    t + 1; it counts where token t + 1 is a response token. Returns (loss, top-1 agreement).
    """
    inputs = {k: v for k, v in batch.items() if k != "response_mask"}
    with torch.no_grad():
        target_logits = target(**inputs).logits[:, :-1]  # (B, L-1, V)
    peer_logits = peer(**inputs).logits[:, :-1]  # (B, L-1, V)
    valid = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).bool()
    response = batch.get("response_mask", valid).bool()
    keep = valid[:, :-1] & valid[:, 1:] & response[:, 1:]  # (B, L-1)
    t, s = target_logits[keep].float(), peer_logits[keep].float()  # (N, V)
    # soft CE: -sum_v p_target(v) log q_peer(v)  (= KL(p || q) + H(p); the same minimiser)
    loss = -(F.softmax(t, dim=-1) * F.log_softmax(s, dim=-1)).sum(-1).mean()
    agreement = float((t.argmax(-1) == s.argmax(-1)).float().mean()) if t.numel() else 0.0
    return loss, agreement


def train_peer(peer, target, batches, budget, seed: int = 0, log=None) -> dict[str, Any]:
    """Distill ``peer`` from ``target`` on an iterator of collated batches for a `TrainBudget`.

    The optimiser settings are those `toy.drafts.distill_draft` gives our draft through `TrainingArguments`: AdamW
    (no weight decay), ``budget.learning_rate`` with cosine decay after ``steps // 20`` warm-up steps, gradient
    norm clipped at 1, one intra-op thread, stop at ``budget.steps`` or ``budget.seconds``.
    """
    from transformers import get_cosine_schedule_with_warmup

    torch.manual_seed(seed)
    params = [p for p in peer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=budget.learning_rate, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, max(1, budget.steps // 20), budget.steps)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    step, loss, agreement = 0, torch.tensor(float("nan")), float("nan")
    peer.train()
    try:
        for step in range(1, budget.steps + 1):
            loss, agreement = peer_distillation_loss(peer, target, next(batches))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            if log is not None and (step % max(1, budget.steps // 5) == 0 or step == budget.steps):
                log(f"peer step {step}: soft CE {loss.item():.3f}, top-1 agreement {agreement:.2f}")
            if budget.seconds is not None and time.perf_counter() - start > budget.seconds:
                break
    finally:
        torch.set_num_threads(threads)
        peer.eval()
    return {
        "train_steps": step,
        "train_time_s": round(time.perf_counter() - start, 1),
        "ce": loss.item(),
        "top1_agreement": agreement,
    }


def toy_batches(processor, rows, batch_size: int, seed: int = 0):
    """Endless shuffled batches of ``rows`` through `SpecVLMDataCollator` (one pass per epoch, last batch kept)."""
    from ..training.collator import SpecVLMDataCollator

    collator = SpecVLMDataCollator(processor)
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(rows), generator=gen).tolist()
        for i in range(0, len(order), batch_size):
            yield collator([rows[j] for j in order[i : i + batch_size]])


def peer_cache_path(label: str, intermediate_size: int, budget, seed: int, cache_dir=None) -> Path:
    from .drafts import TRAINING_RECIPE
    from .world import toy_cache_dir

    name = f"{label}__assisted-peer-i{intermediate_size}__s{budget.steps}-b{budget.batch_size}-seed{seed}-v{TRAINING_RECIPE}"
    return toy_cache_dir(cache_dir) / "drafts" / name


def load_or_train_peer(
    target,
    processor,
    label: str,
    intermediate_size: int,
    budget,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    num_examples: int = 2000,
    log=print,
):
    """The cached peer for (target, MLP width, budget), distilled on the toy rows our drafts train on."""
    from .demo import load_rows
    from .drafts import save_draft

    path = peer_cache_path(label, intermediate_size, budget, seed, cache_dir)
    if (path / "config.json").exists():
        log(f"loading cached assisted peer {path}")
        peer = SpecVLMToyPeer.from_pretrained(path).eval()
        peer.requires_grad_(False)
        return peer, path
    log(
        f"distilling the assisted peer (1 decoder layer, MLP {intermediate_size}) from the target: {budget.steps} steps"
    )
    peer = new_peer(target, intermediate_size, seed=seed)
    rows = load_rows(
        None, max(64, min(num_examples, budget.steps * budget.batch_size)), seed
    )  # as our drafts
    rows = [rows[i] for i in range(len(rows))]
    metrics = train_peer(
        peer, target, toy_batches(processor, rows, budget.batch_size, seed), budget, seed, log
    )
    peer.requires_grad_(False)
    save_draft(peer, path, metrics)
    log(f"assisted peer trained in {metrics['train_time_s']} s, cached at {path}")
    return peer, path


def widen_peer(peer, big_target):
    """The tiny-width peer widened exactly to ``big_target``'s residual width (heads and MLP keep their size)."""
    from .widen import widen_toy_target

    text = peer.config.get_text_config()
    dims = {
        "hidden": big_target.config.get_text_config().hidden_size,
        "intermediate": text.intermediate_size,
        "heads": text.num_attention_heads,
        "layers": text.num_hidden_layers,
        "kv_heads": text.num_key_value_heads,
    }
    wide = widen_toy_target(peer, dims=dims)
    wide.config.name_or_path = "specvlm-toy-assisted-peer-wide"
    out = SpecVLMToyPeer(wide.config)
    out.load_state_dict(wide.state_dict())
    out.generation_config = wide.generation_config
    out.requires_grad_(False)
    return out.to(next(big_target.parameters()).dtype).eval()
