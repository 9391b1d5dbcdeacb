"""What the automatic budget measured about the machine, kept across processes in the cache directory.

A process that calls `generate` once (a script, a CLI, a notebook cell after a restart) would otherwise learn the
verify cost curve c(n), the draft's level time and the step overhead from scratch on every run: its first steps
are a plain one and probes of 2, 4, 8 tokens (`budget.VerifyCosts.explore_limit`). Those times are the machine's
and the models' shapes', so they are saved at the end of a call and a fresh state in a later process starts from
them (`budget.planner_for`). What the target accepts is not saved: it belongs to the draft's weights and the
prompts, and a call learns it in a few steps.

Where: ``$SPECVLM_HF_CACHE/budget/`` (else ``~/.cache/specvlm_hf/budget/``), one JSON file per key. The key is a
hash of the machine (host name, processor, accelerator, CPU threads, torch and transformers versions), the models
(target and draft configurations and wrappers, the target's name, the kinds and dtypes of their weights -- quantized
ones included --, device placement, attention implementation, the draft's backend switches), the batch size and
the decoding mode: a different machine or model never reads another's file. (The context length is not in the key:
the running estimates follow it, as they do within a process.)
``SPECVLM_HF_BUDGET_CACHE=0`` turns saving and loading off.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import time
from functools import cache
from pathlib import Path

import torch
import transformers

from ..targets import families

VERSION = 1  # of the file's contents
SAVE_EVERY_S = 60.0  # a key's file is rewritten at most this often unless new sizes were measured


def cache_root() -> Path:
    """``$SPECVLM_HF_CACHE``, else ``~/.cache/specvlm_hf``: the project's cache directory."""
    env = os.environ.get("SPECVLM_HF_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "specvlm_hf"


def enabled() -> bool:
    return os.environ.get("SPECVLM_HF_BUDGET_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")


@cache
def _processor() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _machine(device) -> dict:
    device = torch.device(device)
    accelerator = None
    if device.type == "cuda":
        accelerator = torch.cuda.get_device_name(device)
    elif device.type != "cpu":
        accelerator = device.type
    return {
        "host": platform.node(),
        "processor": _processor(),
        "accelerator": accelerator,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def _weights(model) -> list[str]:
    """The kinds of tensor the weights are (quantized weights are tensor subclasses or other dtypes) and their
    dtypes, in the model's order."""
    return sorted({f"{type(p).__name__}:{p.dtype}" for p in model.parameters()})


def _models(draft, target) -> dict:
    model = families.unwrap_target(target)
    return {
        "wrapper": type(target).__name__,  # (a PEFT model around the target, ...)
        "target": model.config.to_json_string(use_diff=False),
        "name": getattr(model.config, "_name_or_path", ""),
        "weights": _weights(model),
        "placement": repr(getattr(target, "hf_device_map", None) or getattr(model, "hf_device_map", None)),
        "attention": str(getattr(model.config, "_attn_implementation", None)),
        "draft": draft.config.to_json_string(use_diff=False),
        "draft_weights": _weights(draft),
        # the draft's decoding backend (`backends`): it sets the draft level time
        "backend": {
            k: v for k, v in sorted(os.environ.items()) if k.startswith("SPECVLM_HF_") and "CACHE" not in k
        },
    }


def path_for(draft, target, device, batch_size: int, mode: str) -> Path | None:
    """The file for this machine, these models, batch size and decoding mode (None: turned off, or the key could
    not be worked out -- a cache is never worth an error)."""
    if not enabled():
        return None
    try:
        key = {
            "machine": _machine(device),
            "models": _models(draft, target),
            "batch": batch_size,
            "mode": mode,
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=repr).encode()).hexdigest()[:32]
    except Exception:  # noqa: BLE001 - an exotic config or device: nothing is kept, decoding goes on
        return None
    return cache_root() / "budget" / f"{digest}.json"


def load(path: Path | None) -> dict | None:
    """The saved times ({"observed": {n: seconds}, "per_token", "overhead_s", "level_s"}), or None (none saved,
    unreadable, or from another version)."""
    if path is None or not enabled():
        return None
    try:
        saved = json.loads(path.read_text())
        if saved.get("version") != VERSION:
            return None
        level_s = saved["level_s"]
        return {
            "observed": {int(n): float(s) for n, s in saved["observed"].items()},
            "per_token": float(saved["per_token"]),
            "overhead_s": float(saved["overhead_s"]),
            "level_s": None if level_s is None else float(level_s),
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def save(
    path: Path, observed: dict[int, float], per_token: float, overhead_s: float, level_s: float | None
) -> bool:
    """Write the times (atomically: a concurrent reader sees the old file or the new one). Returns whether it
    wrote; a failure to write (read-only home, full disk) is not an error of the generate call."""
    if not enabled() or not observed:
        return False
    contents = {
        "version": VERSION,
        "saved": time.time(),
        "observed": {str(n): s for n, s in sorted(observed.items())},
        "per_token": per_token,
        "overhead_s": overhead_s,
        "level_s": level_s,
    }
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
            temporary = f.name
            json.dump(contents, f)
        os.replace(temporary, path)
        return True
    except Exception:  # noqa: BLE001 - the call's output is what matters
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        return False
