"""The frozen target sharded across ranks with FSDP2 (`torch.distributed.fsdp.fully_shard`) for distillation.

A 72B bf16 target (144 GB) fits no single 80 GB device, but the draft only ever needs the target's forward.
`shard_target` splits the target's parameters over the ranks of the default process group, the way accelerate's
FSDP2 "transformer based wrap" does for a model it trains: every block transformers marks as
`_no_split_modules` (decoder layers, vision-encoder layers, vision embeddings) becomes one FSDP unit, and the
root unit holds what is left (norms, the multimodal projector, ...). A unit's parameters are all-gathered just
before its forward and freed right after (`reshard_after_forward=True`, the root's included: with no backward the
root's default of keeping them would keep them for good), so a rank holds 1/N of every unit plus at most one
gathered unit at a time.

The token embedding and `lm_head` stay whole on every rank (FSDP's `ignored_params`): the draft shares both by
reference (`SpecVLMDraftModel.bind`) and calls them outside the target's forward, on rows of its own, where no
all-gather would run. They are a few percent of a large target (Qwen2-VL-72B: 2 x 152064 x 8192 bf16 = 5.0 GB of
147 GB), so per rank:

    target bytes = embedding + lm_head (whole)  +  everything else / N   (+ one gathered unit during a forward)

Nothing changes in the draft: it trains data-parallel (DDP) on the same ranks as the Trainer's model, and a
checkpoint holds the draft alone (the target is reloaded from where it came from).

Every rank must run the target the same number of times (each forward is a sequence of collectives): the Trainer
gives every rank the same number of steps, and a rank with no rows left would hang the others.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..targets import families as targets

logger = logging.getLogger(__name__)

TARGET_SHARDING_CHOICES = (None, "none", "fsdp")


def check_target_sharding(value) -> str | None:
    """Normalise `target_sharding` (None/"none": whole target on every rank; "fsdp": sharded); raise on others."""
    if value not in TARGET_SHARDING_CHOICES:
        raise ValueError(
            f"invalid target_sharding={value!r}; expected None (the whole target on every rank) or 'fsdp' "
            "(the frozen target's parameters sharded across the ranks with FSDP2)."
        )
    return None if value in (None, "none") else value


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` (or a module inside it) was sharded with `fully_shard`."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in targets.unwrap_target(model).modules())


def whole_parameters(model: nn.Module) -> set[nn.Parameter]:
    """The parameters kept whole on every rank: the token embedding and `lm_head` (tied or not)."""
    base = targets.unwrap_target(model)
    keep = set()
    for module in (targets.input_embeddings(base), targets.output_embeddings(base)):
        if module is not None:
            keep.update(module.parameters())
    return keep


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The blocks that become FSDP units: every module whose class is in `_no_split_modules`, outermost first."""
    base = targets.unwrap_target(model)
    names = set(getattr(base, "_no_split_modules", None) or ())
    units, inside = [], set()
    for name, module in base.named_modules():
        if type(module).__name__ in names and not any(name.startswith(p + ".") for p in inside):
            units.append(module)
            inside.add(name)
    return units


def shard_target(model: nn.Module, device: torch.device | str | None = None) -> nn.Module:
    """Shard a frozen target's parameters across the ranks of the default process group (in place).

    device: where each rank's shards live (default: cuda:<local rank> when CUDA is available, else cpu); the
    parameters may start on the CPU (each block moves to the device as it is sharded) or already there.
    Returns `model`. A model sharded already is returned as it is. Needs `torch.distributed` initialised (torchrun
    / accelerate launch); the target should be frozen first (this is for forwards only).
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if is_sharded(model):
        return model
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "target_sharding='fsdp' needs torch.distributed initialised: launch with `torchrun --nproc_per_node N` "
            "or `accelerate launch --num_processes N` (one process per device)."
        )
    base = targets.unwrap_target(model)
    if getattr(base, "hf_device_map", None) is not None or getattr(base, "is_quantized", False):
        raise ValueError(
            "target_sharding='fsdp' cannot shard a target loaded with device_map=... or quantized: load it whole "
            "on the CPU (from_pretrained(..., dtype=torch.bfloat16), no device_map) and let the trainer shard it."
        )
    if any(p.requires_grad for p in base.parameters()):
        raise ValueError("shard_target: freeze the target first (target.requires_grad_(False)).")
    device = torch.device(device) if device is not None else _default_device()
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    keep = whole_parameters(base)
    units = shard_units(base)
    if not units:
        raise ValueError(
            f"shard_target: {type(base).__name__} lists no `_no_split_modules` blocks to shard; it cannot be "
            "sharded block by block."
        )
    for unit in units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=True, ignored_params=keep)
    fully_shard(base, mesh=mesh, reshard_after_forward=True, ignored_params=keep)
    # what FSDP does not manage (the whole embedding and lm_head, buffers outside the units) goes to the device too
    for param in keep:
        if param.device != device:
            param.data = param.data.to(device)
    for module in base.modules():
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and buf.device != device:
                setattr(module, name, buf.to(device))  # stays a registered buffer
    return model


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        import os

        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


@dataclass(frozen=True)
class TargetBytes:
    """Target parameter bytes one rank holds: `whole` (embedding, lm_head) + `sharded` (its shards of the rest)."""

    whole: int
    sharded: int
    full: int  # the whole target, unsharded

    @property
    def local(self) -> int:
        return self.whole + self.sharded


def target_parameter_bytes(model: nn.Module) -> TargetBytes:
    """Bytes of target parameters on this rank (DTensor parameters count their local shard)."""
    from torch.distributed.tensor import DTensor

    whole = sharded = full = 0
    for param in targets.unwrap_target(model).parameters():
        size = param.element_size()
        if isinstance(param, DTensor):
            sharded += param.to_local().numel() * size
            full += param.numel() * size  # the global shape
        else:
            whole += param.numel() * size
            full += param.numel() * size
    return TargetBytes(whole=whole, sharded=sharded, full=full)


__all__ = [
    "TARGET_SHARDING_CHOICES",
    "TargetBytes",
    "check_target_sharding",
    "is_sharded",
    "shard_target",
    "shard_units",
    "target_parameter_bytes",
    "whole_parameters",
]
