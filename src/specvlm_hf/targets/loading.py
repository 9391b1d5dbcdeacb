"""Targets as users load them: quantized (bitsandbytes, torchao, quanto) or dispatched by accelerate with parts
offloaded to CPU or disk.

The draft shares two of the target's modules, its token embedding and its `lm_head`. On a loaded target these may
be quantized (their `.weight` is packed storage: int8 / uint8 / a tensor subclass) or offloaded (an accelerate hook
loads the weight for the forward; outside it `.weight` lies on the meta device). The draft therefore uses them only
through their forward (`module(x)`), with inputs on the device and in the dtype that forward expects
(`module_inputs`), and never reads `.weight` for computation. Where it needs weights themselves (the rows of a
reduced draft vocabulary's head, initialised from the target's) it takes them through the forward too
(`dense_linear_rows`): one product with identity rows, a dense copy of just those rows, made once.

`QUANTIZATION_CHOICES` names the schemes tested end to end (greedy output equal to plain `generate` of the same
loaded model, tree and chain, batch 1 and 2; README "Quantized and offloaded targets"); `quantization_config`
builds the transformers config for one of them.
"""

from __future__ import annotations

import torch
from torch import nn

# scheme name -> what it is (the `--quantization` choices of `specvlm train` / `specvlm bench`)
QUANTIZATION_CHOICES: dict[str, str] = {
    "bnb-8bit": "bitsandbytes LLM.int8 (BitsAndBytesConfig(load_in_8bit=True))",
    "bnb-nf4": "bitsandbytes 4-bit NF4 (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4'))",
    "torchao-int8": "torchao int8 weight-only (TorchAoConfig(Int8WeightOnlyConfig()))",
    "quanto-int8": "optimum-quanto int8 weights (QuantoConfig(weights='int8'))",
}
_PACKAGES = {"bnb": "bitsandbytes>=0.50", "torchao": "torchao", "quanto": "optimum-quanto"}


def quantization_config(name: str, compute_dtype: torch.dtype = torch.float32, skip_modules=None):
    """The transformers quantization config for scheme `name` (`QUANTIZATION_CHOICES`).

    compute_dtype: what 4-bit layers compute in (the dtype the rest of the target is loaded in).
    skip_modules: modules left unquantized (None: the library's default, which keeps `lm_head` dense).
    Raises ValueError for an unknown name and ImportError naming the package when its library is missing."""
    if name not in QUANTIZATION_CHOICES:
        raise ValueError(f"unknown quantization {name!r}; choose from {sorted(QUANTIZATION_CHOICES)}")
    library = name.split("-")[0]
    module = {"bnb": "bitsandbytes", "torchao": "torchao", "quanto": "optimum.quanto"}[library]
    try:
        __import__(module)
    except ImportError as error:
        raise ImportError(
            f"--quantization {name} needs {module}: pip install '{_PACKAGES[library]}' "
            "(or pip install 'specvlm_hf[quant]')."
        ) from error
    from transformers import BitsAndBytesConfig, QuantoConfig, TorchAoConfig

    if name == "bnb-8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
    if name == "bnb-nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute_dtype,
            llm_int8_skip_modules=skip_modules,
        )
    if name == "torchao-int8":
        from torchao.quantization import Int8WeightOnlyConfig

        return TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=skip_modules)
    return QuantoConfig(weights="int8", modules_to_not_convert=skip_modules)


def quantization_method(model) -> str | None:
    """How `model` was quantized when loaded ("bitsandbytes", "torchao", "quanto", ...), or None."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is None:
        return None
    method = config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", None)
    return str(getattr(method, "value", method)) if method is not None else "unknown"


def _hooks(module: nn.Module) -> list:
    """accelerate hooks on `module` (a SequentialHook's members flattened)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])


def is_offloaded(module: nn.Module) -> bool:
    """Whether an accelerate hook loads `module`'s own weights for each forward (CPU or disk offload)."""
    return any(getattr(h, "offload", False) for h in _hooks(module))


def dense_weight(weight) -> bool:
    """A plain floating tensor holding its values (not packed storage, a tensor subclass, or the meta device)."""
    return (
        type(weight) in (torch.Tensor, nn.Parameter)
        and weight.is_floating_point()
        and weight.device.type != "meta"
    )


def execution_device(module: nn.Module) -> torch.device:
    """Where `module`'s forward computes: an accelerate hook's execution device, else its weight's device."""
    for hook in _hooks(module):
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device(device)
    for tensor in (*module.parameters(recurse=True), *module.buffers(recurse=True)):
        if tensor.device.type != "meta":
            return tensor.device
    raise ValueError(
        f"The target's {type(module).__name__} has its weights on the meta device and no accelerate hook loads "
        "them: load the target with from_pretrained(..., device_map=...) (accelerate offloads through hooks) or "
        "materialise it before binding the draft."
    )


def compute_dtype(module: nn.Module, fallback: torch.dtype) -> torch.dtype:
    """The dtype `module`'s forward takes its input in: a dense (or offloaded) floating weight's dtype, a 4-bit
    layer's `compute_dtype`, else `fallback` (int8 layers cast their input themselves)."""
    weight = getattr(module, "weight", None)
    if type(weight) in (torch.Tensor, nn.Parameter) and weight.is_floating_point():
        return weight.dtype  # (dense, or the meta placeholder of an offloaded dense weight)
    dtype = getattr(module, "compute_dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else fallback


def module_inputs(module: nn.Module, fallback: torch.dtype) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) to hand `module(x)` its input in (`execution_device`, `compute_dtype`)."""
    return execution_device(module), compute_dtype(module, fallback)


@torch.no_grad()
def dense_linear_rows(
    module: nn.Module, rows: torch.Tensor, dtype: torch.dtype, chunk: int = 256
) -> torch.Tensor:
    """Rows `rows` of a linear layer's weight (out, in) as a dense (len(rows), in) tensor of `dtype`, taken through
    the layer's forward: W^T = module(I) - module(0), by chunks of identity rows (never reading packed storage;
    works for quantized and offloaded layers alike). Quantized layers give their dequantized weight (LLM.int8 also
    rounds its input to int8, which identity rows survive exactly)."""
    device, in_dtype = module_inputs(module, dtype)
    size = _in_features(module)
    rows = rows.to(device)
    bias = module(torch.zeros(1, size, device=device, dtype=in_dtype)).float()[0, rows]  # (n,)
    parts = []
    for start in range(0, size, chunk):
        n = min(chunk, size - start)
        eye = torch.zeros(n, size, device=device, dtype=in_dtype)
        eye[torch.arange(n), start + torch.arange(n)] = 1
        parts.append(module(eye).float()[:, rows] - bias)  # (n, len(rows)): columns start..start+n of W[rows]
    return torch.cat(parts).t().contiguous().to(dtype)


def _in_features(module: nn.Module) -> int:
    size = getattr(module, "in_features", None)
    if size is None:
        raise ValueError(f"{type(module).__name__} is not a linear layer (no in_features)")
    return int(size)


def reload_quantized(model, name: str):
    """`model` (an in-memory transformers model, e.g. the widened toy target) saved and loaded back with
    `from_pretrained(..., quantization_config=quantization_config(name))`, as a user loads a checkpoint quantized.
    The float weights pass through a temporary folder; the returned model is in eval mode with no gradients."""
    import tempfile

    dtype = next(model.parameters()).dtype
    config = quantization_config(name, compute_dtype=dtype)
    with tempfile.TemporaryDirectory(prefix="specvlm-quantize-") as path:
        model.save_pretrained(path)
        kwargs = {"device_map": "auto"} if torch.cuda.is_available() else {}
        loaded = type(model).from_pretrained(path, dtype=dtype, quantization_config=config, **kwargs)
    loaded.generation_config = model.generation_config
    return loaded.eval().requires_grad_(False)


@torch.no_grad()
def dense_copy(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """A dense copy of a shared module's weight in `dtype` (what an export writes): the weight itself when dense;
    an offloaded one loaded by its accelerate hook; a quantized linear's rows through its forward
    (`dense_linear_rows`). Raises ValueError naming the fix for anything else (a quantized embedding)."""
    weight = module.weight
    if dense_weight(weight):
        return weight.detach().to(dtype)
    if is_offloaded(module):
        from accelerate.utils import align_module_device

        with align_module_device(module, execution_device(module)):
            if dense_weight(module.weight):
                return module.weight.detach().to(dtype).clone()
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return dense_linear_rows(module, torch.arange(module.out_features), dtype)
    raise ValueError(
        f"The target's {type(module).__name__} is quantized and is not a linear layer: its dense weight cannot be "
        "taken through its forward. Bind the draft to the target loaded without quantization to export it."
    )
