"""Left-padded batches of tiny-model prompts, combined the way each family's processor batches them.

Test-support module (not a test file). `make_batch_inputs(family, model, seeds, prompt_lens)` builds one
`tiny_models.make_inputs` prompt per row and joins them: `input_ids` left-padded with the generation config's
pad id (`tiny_models.PAD_ID`), `attention_mask` 0 on the pads, per-token type ids left-padded with 0, and the
image tensors combined per family:

* llava, gemma3, paligemma, mistral3: `pixel_values` stacked on a new batch dim (mistral3: `image_sizes` too);
* llava_next, llava_onevision: `pixel_values` (B, patches, 3, H, W) zero-padded to the most patches of a row,
  `image_sizes` stacked (the processor's layout);
* idefics3, smolvlm: `pixel_values` (B, images, 3, H, W) zero-padded to the most images of a row;
* qwen2_vl, qwen2_5_vl, qwen3_vl: `pixel_values` and `image_grid_thw` concatenated on dim 0 (rows of patches),
  `mm_token_type_ids` left-padded with 0;
* internvl: tiles concatenated on dim 0.

`row_slice(batch, b)` gives back row b's own batch-1 inputs (pads removed), which `make_inputs` also returns.
"""

from __future__ import annotations

import torch

from tiny_models import PAD_ID, make_inputs

TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")
STACK = ("llava", "gemma3", "paligemma", "mistral3")
PAD_STACK = ("llava_next", "llava_onevision", "idefics3", "smolvlm")
CONCAT = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "internvl")


def pad_id(model) -> int:
    """The pad id batches are built with (the one plain generate fills finished rows with)."""
    pad = model.generation_config.pad_token_id
    return PAD_ID if pad is None else int(pad)


def _left_pad(rows: list[torch.Tensor], value: int) -> torch.Tensor:
    width = max(r.shape[-1] for r in rows)
    out = torch.full((len(rows), width), value, dtype=rows[0].dtype)
    for b, r in enumerate(rows):
        out[b, width - r.shape[-1] :] = r[0]
    return out


def _pad_stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Each (1, n_b, ...) -> (B, max n_b, ...), zero-padded at the end of dim 1."""
    most = max(t.shape[1] for t in tensors)
    out = tensors[0].new_zeros(len(tensors), most, *tensors[0].shape[2:])
    for b, t in enumerate(tensors):
        out[b, : t.shape[1]] = t[0]
    return out


def combine(family: str, rows: list[dict], pad: int = PAD_ID) -> dict:
    """Join batch-1 `make_inputs` dicts into one left-padded batch (see module docstring)."""
    keys = set(rows[0])
    assert all(set(r) == keys for r in rows), "rows of one family carry the same keys"
    batch = {}
    for key in TOKEN_KEYS:
        if key in keys:
            batch[key] = _left_pad([r[key] for r in rows], pad if key == "input_ids" else 0)
    for key in sorted(keys - set(TOKEN_KEYS)):
        tensors = [r[key] for r in rows]
        if key == "image_sizes" or key.endswith("grid_thw"):
            batch[key] = torch.cat(tensors, 0)  # one (h, w) / (t, h, w) row per image
        elif family in STACK:
            batch[key] = torch.cat(tensors, 0)  # (1, 3, H, W) each
        elif family in PAD_STACK:
            batch[key] = _pad_stack(tensors)
        elif family in CONCAT:
            batch[key] = torch.cat(tensors, 0)
        else:
            raise ValueError(f"no batching rule for {family!r} {key!r}")
    return batch


def make_batch_inputs(family: str, model, seeds, prompt_lens) -> dict:
    """A left-padded batch of `make_inputs(family, model, seed=s, prompt_len=p)` rows."""
    assert len(seeds) == len(prompt_lens)
    rows = [make_inputs(family, model, seed=s, prompt_len=p) for s, p in zip(seeds, prompt_lens)]
    return combine(family, rows, pad_id(model))


def real_lengths(batch: dict) -> list[int]:
    """Real (unpadded) prompt length of every row."""
    return [int(n) for n in batch["attention_mask"].sum(1)]


def generated_rows(out: torch.Tensor, prompt_width: int, pad: int, eos=None) -> list[list[int]]:
    """Each row's generated tokens: after the prompt, up to and including its EOS, without the pad fill.

    Plain generate fills a row after its EOS with `pad`; without an EOS no token is padding."""
    eos_ids = set() if eos is None else ({eos} if isinstance(eos, int) else set(eos))
    rows = []
    for b in range(out.shape[0]):
        tokens = out[b, prompt_width:].tolist()
        for i, t in enumerate(tokens):
            if t in eos_ids:
                tokens = tokens[: i + 1]
                break
        rows.append(tokens)
    return rows
