"""Online distillation of a SpecVLM draft from its frozen target, as a `transformers.Trainer`.

Each step runs the frozen target on the batch (no grad) and trains the draft on the target's own features
(EAGLE-style teacher forcing):

    target(x_0..x_{L-1})        -> inputs_embeds e_t, features f_t, logits z_t (z_t: distribution of x_{t+1})
    draft row r = [e_{r+1}; f_r] -> draft output d_r, predicting f_{r+1} and z_{r+1} (the target's x_{r+2})
    loss = 0.1 * soft_CE(softmax(z_{r+1}), lm_head(d_r)) + 1.0 * SmoothL1(d_r, f_{r+1}) + gate cost

(with a reduced draft vocabulary the CE is between the target restricted to it and the draft's own head)

averaged over rows whose input token x_{r+1} is a response token (`response_mask`): those are the rows the draft
runs on while the target generates. Only the draft is a module of the Trainer: DDP/FSDP wrap it, checkpoints
hold it alone, the optimizer sees only its parameters. The target is an attribute held outside the module tree.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, Trainer, TrainingArguments

from ..draft.configuration_specvlm import DEFAULT_CHAIN_TOKENS
from ..draft.modeling_specvlm import SpecVLMDraftModel, additive_mask, causal_mask
from ..targets import families as targets
from ..targets import features as target_features
from ..targets.loading import execution_device
from .collator import SpecVLMDataCollator
from .eval_acceptance import EvalAcceptance
from .losses import distillation_loss, expected_accepted_length, top1_agreement
from .sharding import check_target_sharding, shard_target

logger = logging.getLogger(__name__)

# batch keys that are ours, not the target's
_NON_TARGET_KEYS = ("response_mask", "labels", "return_loss", "num_items_in_batch")
# per-image / per-video tensors a row's visual layout needs (split per row for `targets.visual_spans`)
_PER_IMAGE_KEYS = ("image_grid_thw", "image_sizes")
_PER_VIDEO_KEYS = ("video_grid_thw", "pixel_values_videos")


def _spans_complete(spans, modality: str) -> bool:
    return all(s.grid is not None for s in spans if s.modality == modality)


def batch_visual_spans(target, input_ids: torch.Tensor, batch: dict[str, Any]) -> list[list]:
    """`targets.visual_spans` for every row of a batch.

    The processor returns per-image tensors (`image_grid_thw`, `image_sizes`, ...) for the whole batch in order;
    each row gets the consecutive slice that exactly explains its placeholders (the one slice for which every
    span's layout is known). Rows whose layout cannot be matched fall back to layout-less spans.
    """
    offsets = {"image": 0, "video": 0}
    per_row = []
    for b in range(input_ids.shape[0]):
        ids = input_ids[b : b + 1]
        row_kwargs: dict[str, Any] = {}
        for modality, keys in (("image", _PER_IMAGE_KEYS), ("video", _PER_VIDEO_KEYS)):
            present = {k: batch[k] for k in keys if batch.get(k) is not None}
            if not present:
                continue
            total = min(len(v) for v in present.values())
            start = offsets[modality]
            chosen = None
            for stop in range(start, total + 1):
                trial = {k: v[start:stop] for k, v in present.items()}
                spans = targets.visual_spans(target, ids, trial)
                if not any(s.modality == modality for s in spans):
                    if stop == start:
                        chosen = (stop, trial)
                        break
                    continue
                if _spans_complete(spans, modality):
                    chosen = (stop, trial)
                    break
            if chosen is not None:
                offsets[modality] = chosen[0]
                row_kwargs.update(chosen[1])
        per_row.append(targets.visual_spans(target, ids, row_kwargs))
    return per_row


def count_response_tokens(
    dataset, data_collator, vocab_size: int, max_rows: int = 4096, batch_size: int = 8
) -> torch.Tensor:
    """How often each target token id occurs among the response tokens of the first `max_rows` dataset rows.

    Rows go through `data_collator` in batches of `batch_size` (as the training dataloader would collate them);
    a batch's `response_mask` (else its `attention_mask`) selects the counted `input_ids`. Returns (vocab_size,) long.
    """
    counts = torch.zeros(vocab_size, dtype=torch.long)

    def add(rows: list) -> None:
        batch = data_collator(rows)
        ids = batch["input_ids"]
        mask = batch.get("response_mask")
        if mask is None:
            mask = batch.get("attention_mask")
        tokens = ids[mask.bool()] if mask is not None else ids.flatten()
        tokens = tokens[(tokens >= 0) & (tokens < vocab_size)].cpu()
        counts.add_(torch.bincount(tokens, minlength=vocab_size))

    rows: list = []
    for i, row in enumerate(dataset):
        if i >= max_rows:
            break
        rows.append(row)
        if len(rows) == batch_size:
            add(rows)
            rows = []
    if rows:
        add(rows)
    return counts


def select_draft_vocab(counts: torch.Tensor, draft_vocab_size: int) -> torch.Tensor:
    """The `draft_vocab_size` most frequent token ids (ties and unseen ids: lowest id first), ascending.

    counts: (V,) token frequencies. With fewer distinct tokens than `draft_vocab_size` the rest is padded with the
    most frequent remaining ids (zero-count ids, lowest first).
    """
    order = torch.argsort(counts, descending=True, stable=True)
    return order[:draft_vocab_size].sort().values


def unrolled_mask(n: int, step: int, valid: torch.Tensor, *, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (B, 1, n, (step + 1) * n) of unrolled step `step` over the keys of steps 0..step.

    Row q of step j continues a chain that decoding starts at row q - j (the last row with a target feature): it
    sees step 0's rows k <= q - j (padding excluded) and, of each later step i, the chain's row q - j + i.
    valid: (B, n) bool, False on padding.
    """
    q = torch.arange(n, device=valid.device)[:, None]
    k = torch.arange(n, device=valid.device)[None, :]
    blocks = [((k <= q - step)[None] & valid[:, None, :])]  # (B, n, n)
    blocks += [(k == q - step + i)[None].expand(valid.shape[0], -1, -1) for i in range(1, step + 1)]
    return additive_mask(torch.cat(blocks, dim=-1)[:, None], dtype)


class SpecVLMDistillationTrainer(Trainer):
    """Train a [`SpecVLMDraftModel`] by online distillation from its frozen target.

    Args:
        model: the draft. It is bound to `target_model` here if it is not bound yet.
        target_model: the target VLM (a transformers model, optionally PEFT-wrapped). It is frozen (eval mode,
            `requires_grad_(False)`) and moved to the training device; it is never wrapped, optimized or saved.
        args: `TrainingArguments`; `remove_unused_columns` is forced to False (the batch carries our keys).
        data_collator: default `SpecVLMDataCollator(processing_class)` when a processor is given.
        ce_weight, feature_weight: loss weights (paper: 0.1 and 1.0).
        feature_noise_std: std of Gaussian noise added to the target features fed to the draft (not to the
            regression targets), to make the draft robust to its own errors at decoding time.
        draft_vocab_rows: with a reduced draft vocabulary (`config.draft_vocab_size`) whose index map is not set
            yet, the map is built from the response tokens of the first `draft_vocab_rows` training rows (the
            `draft_vocab_size` most frequent target tokens) and the draft head starts from the target `lm_head`'s
            rows of those tokens. The head is trained on the target's distribution restricted to that vocabulary.
        unroll_steps: k > 1 enables the EAGLE-3 "training-time test": step j feeds the draft its own step-(j-1)
            feature predictions (f_hat_{r} at row r, same tokens) and adds the loss of every step (mean over steps).
            With several target layers the fed-back rows go straight into the h-wide feature slot (`fc` of
            "eagle3", `feature_proj` of "eagle" project the target's), as in decoding. Step j's row r attends as
            decoding would after j drafted tokens (`unrolled_mask`: step 0's rows up to r - j, then the chain's
            rows of steps 1..j); with a compressor, to its own step's rows. Default 1 (teacher forcing).
        eval_acceptance: the draft's real acceptance logged at every evaluation (`eval_acceptance.EvalAcceptance`:
            mean accepted length of fixed-k chain decoding and of the automatic tree on a few evaluation prompts);
            default `EvalAcceptance()`, None turns it off.
        target_sharding: None (default): every rank holds the whole target. "fsdp": the frozen target's
            parameters are sharded across the ranks with FSDP2 (`training.sharding`: decoder and vision blocks
            split N ways, the embedding and `lm_head` the draft shares kept whole on every rank); the draft still
            trains data-parallel. Launch with `torchrun` / `accelerate launch`; with one process it is a no-op.
        The other arguments are `transformers.Trainer`'s.

    Logged metrics (train and eval): `ce`, `feature`, `gate_cost`, `top1_agreement` (draft argmax == target
    argmax on response rows; `top1_agreement_step{j}` per unrolled step), `accepted_length_estimate`
    (`losses.expected_accepted_length` over `config.num_draft_tokens` steps) and, with a compressor,
    `visual_keep_ratio`. Eval only: `accepted_length_chain{k}` and `accepted_length_tree` (`eval_acceptance`).
    """

    def __init__(
        self,
        model: SpecVLMDraftModel,
        target_model: nn.Module,
        args: TrainingArguments | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        *,
        ce_weight: float = 0.1,
        feature_weight: float = 1.0,
        feature_noise_std: float = 0.0,
        unroll_steps: int = 1,
        draft_vocab_rows: int = 4096,
        eval_acceptance: EvalAcceptance | None = EvalAcceptance(),  # noqa: B008 (immutable settings)
        target_sharding: str | None = None,
        **kwargs,
    ):
        target_sharding = check_target_sharding(target_sharding)
        if not isinstance(model, SpecVLMDraftModel):
            raise TypeError(f"model must be a SpecVLMDraftModel, got {type(model).__name__}.")
        if target_model is None:
            raise ValueError("SpecVLMDistillationTrainer needs the frozen target: pass target_model=vlm.")
        if unroll_steps < 1:
            raise ValueError(f"invalid unroll_steps={unroll_steps!r}; expected an integer >= 1.")
        if feature_noise_std < 0:
            raise ValueError(f"invalid feature_noise_std={feature_noise_std!r}; expected a number >= 0.")
        if args is None:
            args = TrainingArguments(output_dir="specvlm_draft", remove_unused_columns=False)
        elif args.remove_unused_columns:
            try:
                args.remove_unused_columns = False
            except dataclasses.FrozenInstanceError:  # older frozen TrainingArguments
                args = dataclasses.replace(args, remove_unused_columns=False)
        if data_collator is None:
            if processing_class is None:
                raise ValueError(
                    "Pass data_collator=SpecVLMDataCollator(processor) (or processing_class=processor): rows in "
                    "the vision-chat format need the target's processor."
                )
            data_collator = SpecVLMDataCollator(processing_class)
        _shard_streams_per_rank(args, train_dataset)

        # the target: frozen, outside the draft's module tree (bind() keeps it in a plain tuple)
        target_model.eval()
        target_model.requires_grad_(False)
        if not model.is_bound:
            model.bind(target_model)
        elif model.target is not targets.unwrap_target(target_model):
            raise ValueError("The draft is bound to a different target than target_model; rebind it first.")
        self.target_model = target_model
        self.ce_weight = ce_weight
        self.feature_weight = feature_weight
        self.feature_noise_std = feature_noise_std
        self.unroll_steps = unroll_steps
        self.eval_acceptance = eval_acceptance
        self.target_sharding = target_sharding
        self._metrics: dict[str, dict[str, list[float]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }
        self._hidden_request: list[int] | bool | None = None

        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        # our loss is a mean over the batch's response rows: let Trainer scale it for gradient accumulation
        self.model_accepts_loss_kwargs = False
        self._place_target()
        if model.draft_lm_head is not None and not model.has_draft_vocab_map:
            if train_dataset is not None:
                self.build_draft_vocab(max_rows=draft_vocab_rows)
            else:
                logger.warning(
                    "The draft has a reduced vocabulary (draft_vocab_size=%d) but no index map and there is no "
                    "train_dataset to build one from: it keeps the default ids 0..%d. Call "
                    "`draft.set_draft_vocab(ids)` or `trainer.build_draft_vocab()` first.",
                    model.config.draft_vocab_size,
                    model.config.draft_vocab_size - 1,
                )

    def build_draft_vocab(self, max_rows: int = 4096) -> torch.Tensor:
        """Set the draft's reduced vocabulary to the most frequent response tokens of the training data."""
        draft: SpecVLMDraftModel = self.model
        counts = count_response_tokens(
            self.train_dataset, self.data_collator, draft.config.vocab_size, max_rows=max_rows
        )
        ids = select_draft_vocab(counts, draft.config.draft_vocab_size)
        draft.set_draft_vocab(ids, init_from_target=True)
        covered = int(counts[ids].sum()) / max(int(counts.sum()), 1)
        logger.info(
            "draft vocabulary: %d tokens cover %.1f%% of the response tokens counted",
            ids.numel(),
            100 * covered,
        )
        return ids

    # ------------------------------------------------------------------ target
    def _place_target(self) -> None:
        """Move the target to the draft's (accelerate's) device unless it is dispatched or quantized; with
        `target_sharding="fsdp"` under several processes, shard it there instead (`sharding.shard_target`)."""
        base = targets.unwrap_target(self.target_model)
        if self.target_sharding == "fsdp" and self.accelerator.num_processes > 1:
            shard_target(self.target_model, self.args.device)
            return
        if getattr(base, "hf_device_map", None) is not None or getattr(base, "is_quantized", False):
            return  # placed by from_pretrained(device_map=...) / quantization; leave it there
        device = self.args.device
        if next(base.parameters()).device != torch.device(device):
            self.target_model.to(device)

    def _target_outputs(self, inputs: dict[str, Any]):
        """Run the frozen target: returns inputs_embeds (B,L,h), draft features (B,L,n*h), last hidden (B,L,h),
        logits (B,L,V)."""
        layers = list(self.model.config.target_layers)
        target_inputs = {k: v for k, v in inputs.items() if k not in _NON_TARGET_KEYS}
        if self._hidden_request is None:
            self._hidden_request = target_features.hidden_state_request(sorted(set(layers) | {-1}))
        with torch.no_grad():
            try:
                out, captured = self._run_target(target_inputs, self._hidden_request)
            except TypeError:
                if self._hidden_request is True:
                    raise
                # some families (LLaVA) pass a list-valued output_hidden_states on to their vision tower, which
                # then lacks the layer it reads its features from: ask for every hidden state instead
                logger.info("target rejected a list of hidden-state indices; requesting all hidden states")
                self._hidden_request = True
                out, captured = self._run_target(target_inputs, True)
        if not captured:
            raise RuntimeError("The target's text decoder was not called; cannot read its input embeddings.")
        features = target_features.select_features(out.hidden_states, layers)
        last = out.hidden_states[-1]
        return captured[0], features, last, out.logits

    def _run_target(self, target_inputs: dict[str, Any], request):
        with target_features.capture_decoder_inputs(self.target_model) as captured:
            out = self.target_model(
                **target_inputs, output_hidden_states=request, use_cache=False, return_dict=True
            )
        return out, captured

    # -------------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        draft: SpecVLMDraftModel = self.model
        input_ids = inputs["input_ids"]
        bsz, seq_len = input_ids.shape
        attention_mask = inputs.get("attention_mask")
        valid = (
            attention_mask.bool()
            if attention_mask is not None
            else torch.ones_like(input_ids, dtype=torch.bool)
        )
        response = inputs.get("response_mask")
        response = response.bool() if response is not None else valid

        inputs_embeds, features, last_hidden, logits = self._target_outputs(inputs)
        # a target dispatched over several devices (device_map) may return these elsewhere than the draft
        device = draft.norm.weight.device  # every draft architecture has `norm` ("eagle3" may have no `fc`)
        inputs_embeds, features, last_hidden = (t.to(device) for t in (inputs_embeds, features, last_hidden))
        valid, response = valid.to(device), response.to(device)
        # (an offloaded lm_head's weight lies on the meta device: where its forward computes)
        lm_head_device = execution_device(targets.output_embeddings(targets.unwrap_target(self.target_model)))
        spans = None
        if draft.compressor is not None:
            spans = batch_visual_spans(self.target_model, input_ids, inputs)

        feats_in = features
        if self.feature_noise_std > 0 and draft.training:
            feats_in = features + torch.randn_like(features) * self.feature_noise_std

        mode = "train" if draft.training else "eval"
        totals: dict[str, torch.Tensor] = {}
        agreements = []
        kept_ratio = None
        # unrolled steps attend as decoding does (EAGLE-3): to the target-fed rows of step 0 before the chain's
        # start and to the chain's own rows of the later steps, kept in a cache. With a compressor (its row layout
        # may change between steps) a step attends to its own rows only.
        cache = DynamicCache() if self.unroll_steps > 1 and draft.compressor is None else None
        for step in range(self.unroll_steps):
            ctx = draft.prepare_context(input_ids, inputs_embeds, feats_in, None, spans, valid)
            mask4d = None
            n = ctx.fused.shape[1]
            if cache is not None and step > 0:
                mask4d = unrolled_mask(n, step, ctx.valid, dtype=ctx.fused.dtype)
            elif not bool(ctx.valid.all()):
                mask4d = causal_mask(
                    n, n, dtype=ctx.fused.dtype, device=ctx.fused.device, key_padding=ctx.valid
                )
            hidden = model(
                fused_inputs=ctx.fused,
                position_ids=ctx.position_ids,
                attention_mask=mask4d,
                past_key_values=cache,
            ).last_hidden_state  # (B, L', h): d_r predicts f_{r+1}

            # rows with a target: real (not compressed/padding) rows r whose input token x_{r+1} is a response token
            rows = ctx.row_index  # (B, L')
            nxt = (rows + 1).clamp(min=0, max=seq_len - 1)  # position r+1
            keep = (rows >= 0) & ctx.valid & torch.gather(response, 1, nxt)
            b_idx, t_idx = keep.nonzero(as_tuple=True)
            pos = nxt[b_idx, t_idx]
            draft_h = hidden[b_idx, t_idx]  # (N, h)
            if draft.draft_lm_head is None:
                draft_logits = draft.compute_logits(draft_h.to(lm_head_device)).to(device)  # (N, V)
                vocab_ids = None
            else:  # reduced vocabulary: (N, Vd) from the draft's own head, vocab_ids (Vd,) their target ids
                draft_logits, vocab_ids = draft.draft_logits(draft_h)
            # (N, V): the target's distribution of x_{r+2}
            target_logits = logits[b_idx.to(logits.device), pos.to(logits.device)].to(device)
            parts = distillation_loss(
                draft_logits,
                draft_h,
                target_logits,
                last_hidden[b_idx, pos],  # f_{r+1}
                None,
                ce_weight=self.ce_weight,
                feature_weight=self.feature_weight,
                gate_cost=ctx.gate_cost,
                draft_vocab_ids=vocab_ids,
            )
            for key, value in parts.items():
                totals[key] = totals.get(key, 0.0) + value / self.unroll_steps
            agreements.append(top1_agreement(draft_logits, target_logits, draft_vocab_ids=vocab_ids))
            if step == 0 and ctx.visual_tokens and sum(ctx.visual_tokens) > 0:
                kept_ratio = sum(ctx.kept_visual_tokens) / sum(ctx.visual_tokens)

            if step + 1 < self.unroll_steps:
                # next step: row r reads the draft's prediction of f_r (its output at row r-1) instead of f_r.
                # The feature slot is h wide: several target layers are projected first (`fc` / `feature_proj`),
                # as decoding does when it puts the draft's own h-wide outputs there; rows without a prediction
                # (the first one, rows after dropped or padding rows) keep the projected target feature.
                real = (rows >= 0) & ctx.valid
                rb, rt = real.nonzero(as_tuple=True)
                pred_pos = rows[rb, rt] + 1
                inside = pred_pos < seq_len
                feats_next = draft.feature_slot(feats_in).clone()  # (B, L, h)
                feats_next[rb[inside], pred_pos[inside]] = hidden[rb[inside], rt[inside]].to(feats_next.dtype)
                feats_in = feats_next

        loss = totals["loss"]
        metrics = self._metrics[mode]
        metrics["ce"].append(float(totals["ce"].detach()))
        metrics["feature"].append(float(totals["feature"].detach()))
        metrics["gate_cost"].append(float(totals["gate_cost"].detach()))
        rates = [float(a) for a in agreements]
        metrics["top1_agreement"].append(rates[0])
        if self.unroll_steps > 1:
            for j, a in enumerate(rates, start=1):
                metrics[f"top1_agreement_step{j}"].append(a)
        metrics["accepted_length_estimate"].append(
            expected_accepted_length(
                rates, depth=max(draft.config.num_draft_tokens or DEFAULT_CHAIN_TOKENS, len(rates))
            )
        )
        if draft.compressor is not None:
            metrics["visual_keep_ratio"].append(1.0 if kept_ratio is None else kept_ratio)
        if return_outputs:
            return loss, {"hidden": hidden}
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation: the distillation loss (and its metrics); no predictions are gathered."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def evaluation_loop(self, dataloader, *args, metric_key_prefix: str = "eval", **kwargs):
        """Trainer's evaluation loop, plus the draft's measured acceptance on the first evaluation rows."""
        output = super().evaluation_loop(dataloader, *args, metric_key_prefix=metric_key_prefix, **kwargs)
        sharded = self.target_sharding == "fsdp" and self.accelerator.num_processes > 1
        if self.eval_acceptance is not None and sharded:
            # every forward of a sharded target is a collective: ranks decoding on their own could disagree on the
            # number of forwards and hang; not measured until decoding runs in lockstep across ranks
            logger.warning(
                "Measured acceptance (eval_acceptance) is skipped with a target sharded across ranks."
            )
        elif self.eval_acceptance is not None:
            draft = self.accelerator.unwrap_model(self.model)
            prompts = self.eval_acceptance.prompts(getattr(dataloader, "dataset", None), self.data_collator)
            # several processes: chain only (the automatic tree's size follows each process's own timings, so
            # processes sharing a sharded target could run different numbers of forwards)
            tree = self.eval_acceptance.tree and self.accelerator.num_processes == 1
            for key, value in self.eval_acceptance.measure(draft, prompts, tree=tree).items():
                output.metrics[f"{metric_key_prefix}_{key}"] = round(value, 6)
        return output

    # ----------------------------------------------------------------- logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Merge the averaged distillation metrics since the last log (train, or eval with prefix `eval_`)."""
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        collected = self._metrics[mode]
        if collected:
            keys = sorted(collected)
            means = torch.tensor([sum(collected[k]) / len(collected[k]) for k in keys], dtype=torch.float64)
            if self.accelerator.num_processes > 1:
                means = self.accelerator.reduce(means.to(self.accelerator.device), reduction="mean").cpu()
            prefix = "eval_" if mode == "eval" else ""
            logs.update({f"{prefix}{k}": round(float(v), 6) for k, v in zip(keys, means)})
            collected.clear()
        super().log(logs, start_time)


def _shard_streams_per_rank(args: TrainingArguments, train_dataset) -> None:
    """A streamed dataset under several processes: each rank reads its own part (its files, else its slice of every
    global batch) instead of accelerate's default for iterable datasets, rank 0 reading and collating every batch
    and sending each rank its slice. No row goes to two ranks either way; set
    `accelerator_config={"dispatch_batches": True}` to keep the default."""
    if not isinstance(train_dataset, torch.utils.data.IterableDataset) or args.world_size <= 1:
        return
    config = args.accelerator_config
    if config is not None and getattr(config, "dispatch_batches", None) is None:
        config.dispatch_batches = False


__all__ = [
    "SpecVLMDistillationTrainer",
    "SpecVLMDataCollator",
    "batch_visual_spans",
    "count_response_tokens",
    "select_draft_vocab",
]
