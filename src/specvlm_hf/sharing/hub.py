"""Share a SpecVLM draft: the folder that goes to the Hugging Face Hub (weights, config, model card,
`custom_generate/`), the push itself, and export to other formats (`export.py`).

    folder = save_for_hub(draft, "out/llava-draft", metrics=json.load(open("bench/results.json")))
    push_draft_to_hub(draft, "org/llava-1.5-7b-specvlm-draft", metrics=...)   # uploads exactly that folder

Only the draft's own weights are written: the target's embedding and `lm_head` are held by reference and are
never part of the draft's state dict. The access token is passed to `huggingface_hub` and nowhere else.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import transformers
from huggingface_hub import HfApi, ModelCard, ModelCardData

from .._version import __version__
from .export import export_draft

logger = logging.getLogger(__name__)

LIBRARY_NAME = "specvlm_hf"
PIP_NAME = "specvlm_hf"
PLACEHOLDER_REPO = "<your-org>/<this-draft>"
TAGS = ("speculative-decoding", "eagle", "eagle-2", "specvlm", "draft-model", "vision-language-model")
# Columns of the metrics table: (record key, header).
METRIC_COLUMNS = (
    ("method", "Method"),
    ("temperature", "Temperature"),
    ("mean_accepted_length", "Mean accepted length"),
    ("speedup", "Speedup"),
    ("tokens_per_second", "Tokens/s"),
    ("lossless", "Lossless"),
    ("hardware", "Hardware"),
)
EXAMPLE_IMAGE = "http://images.cocodataset.org/val2017/000000039769.jpg"


# ------------------------------------------------------------------------------------------ metrics
def normalize_metrics(metrics: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Split what `save_for_hub` accepts as `metrics` into (benchmark records, training setup).

    Accepted: None; a list of records as `specvlm bench` writes to results.json; one record (a dict with
    "method" or "speedup"); or a dict {"results": [...], "training": {...}, "hardware": "..."}. A top-level
    "hardware" fills the records that lack one.
    """
    if metrics is None:
        return [], {}
    if isinstance(metrics, Mapping):
        metrics = dict(metrics)
        training = dict(metrics.pop("training", None) or {})
        hardware = metrics.pop("hardware", None)
        if "results" in metrics:
            records = list(metrics.pop("results") or [])
        elif metrics and any(key in metrics for key in ("method", "speedup", "mean_accepted_length")):
            records = [metrics]
        else:
            records = []
    elif isinstance(metrics, Sequence) and not isinstance(metrics, str):
        records, training, hardware = list(metrics), {}, None
    else:
        raise TypeError(
            f"metrics must be None, a list of benchmark records or a dict, not {type(metrics).__name__}"
        )
    out = []
    for record in records:
        if not isinstance(record, Mapping):
            raise TypeError(f"each benchmark record must be a dict, not {type(record).__name__}")
        record = dict(record)
        if hardware is not None:
            record.setdefault("hardware", hardware)
        out.append(record)
    return out, training


def _format_cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value).replace("|", "\\|")


def metrics_table(records: list[dict[str, Any]]) -> str:
    """Markdown table of benchmark records (columns present in at least one record)."""
    columns = [(key, header) for key, header in METRIC_COLUMNS if any(key in r for r in records)]
    if not columns:
        return ""
    lines = [
        "| " + " | ".join(header for _, header in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for record in records:
        lines.append("| " + " | ".join(_format_cell(record.get(key)) for key, _ in columns) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ model card
def _target_class_name(config) -> str:
    name = config.target_architecture
    return name if name and hasattr(transformers, name) else "AutoModelForImageTextToText"


def usage_snippet(config, repo_id: str) -> str:
    """A runnable example: load the target, load + bind the draft, generate with it."""
    target = config.target_name_or_path or "<target-model-id>"
    target_cls = _target_class_name(config)
    return f'''```python
# pip install {PIP_NAME}
import torch
from transformers import AutoProcessor, {target_cls}

import specvlm_hf  # registers the SpecVLM draft with transformers' Auto classes
from specvlm_hf import SpecVLMDraftModel

target_id = "{target}"
processor = AutoProcessor.from_pretrained(target_id)
vlm = {target_cls}.from_pretrained(target_id, dtype=torch.bfloat16, device_map="auto")
draft = SpecVLMDraftModel.from_pretrained("{repo_id}", target=vlm, dtype=torch.bfloat16)

messages = [{{"role": "user", "content": [
    {{"type": "image", "url": "{EXAMPLE_IMAGE}"}},
    {{"type": "text", "text": "Describe this image in detail."}},
]}}]
inputs = processor.apply_chat_template(
    messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
).to(vlm.device)

out = vlm.generate(**inputs, assistant_model=draft, max_new_tokens=256)  # lossless: same output as without draft
print(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
print(draft.last_generation_stats)  # target forwards, accepted lengths, mean accepted length

# Sampling is lossless too (the output distribution is exactly the target's):
out = vlm.generate(**inputs, assistant_model=draft, do_sample=True, temperature=0.7, max_new_tokens=256)
```'''


def _draft_description(config) -> list[str]:
    compressor = config.compressor_mode or "none (every visual token reaches the draft)"
    rows = [
        ("Target", f"`{config.target_name_or_path}` (`{config.target_architecture}`)"),
        (
            "Target family / model type",
            f"`{config.target_family or '-'}` / `{config.target_model_type or '-'}`",
        ),
        (
            "Draft",
            ('EAGLE-3 (`draft_architecture="eagle3"`), ' if config.draft_architecture == "eagle3" else "")
            + f"{config.num_hidden_layers} decoder layer(s), hidden {config.hidden_size}, "
            f"{config.num_attention_heads} heads ({config.num_key_value_heads} KV), MLP {config.intermediate_size}",
        ),
        ("Target features", f"`target_layers={config.target_layers}`"),
        (
            "Draft vocabulary",
            "the target's full vocabulary"
            if config.draft_vocab_size is None
            else f"{config.draft_vocab_size} most frequent target tokens of {config.vocab_size} "
            "(own head; index map `draft_vocab_ids` in the weights)",
        ),
        ("Visual compressor (draft side)", f"`{compressor}`"),
        ("Decoding", _decoding_description(config)),
        ("Written by", f"`{LIBRARY_NAME}` {config.specvlm_hf_version}"),
    ]
    return ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]


def _decoding_description(config) -> str:
    tree = (config.tree_top_k, config.tree_depth, config.tree_total_tokens)
    tree_text = (
        "tree budget chosen per step for the hardware at hand"
        if all(v is None for v in tree)
        else f"tree: top_k {config.tree_top_k}, depth {config.tree_depth}, {config.tree_total_tokens} tokens"
    )
    chain = config.num_draft_tokens
    chain_text = "chain length automatic" if chain is None else f"chain: {chain} tokens"
    return f"`{config.decoding_mode}` ({tree_text}; {chain_text})"


def build_model_card(
    draft, metrics: Any = None, *, repo_id: str | None = None, training: Mapping[str, Any] | None = None
) -> ModelCard:
    """The model card (README.md) of a draft: Hub metadata, what it is, how to use it, training, results."""
    config = draft.config
    records, metric_training = normalize_metrics(metrics)
    training = {**metric_training, **dict(training or {})}
    repo_id = repo_id or PLACEHOLDER_REPO
    tags = list(TAGS)
    if config.target_family:
        tags.append(config.target_family)
    card_data = ModelCardData(
        base_model=config.target_name_or_path,
        library_name=LIBRARY_NAME,
        pipeline_tag="image-text-to-text",
        tags=tags,
    )
    title = repo_id.split("/")[-1] if repo_id != PLACEHOLDER_REPO else "SpecVLM draft"
    if config.draft_architecture == "eagle3":
        what = (
            f"A **SpecVLM draft model in the EAGLE-3 architecture** that speeds up `{config.target_name_or_path}` "
            "with lossless speculative decoding. The draft predicts the target's next tokens from the target's "
            f"own hidden states (`target_layers={config.target_layers}`"
            + (", projected to g_t by `fc`" if config.num_fused_layers > 1 else ", g_t = the feature")
            + "; its first decoder layer attends over `[norm(embed(x_t+1)); norm(g_t)]`)"
        )
    else:
        what = (
            f"A **SpecVLM / EAGLE-2 draft model** that speeds up `{config.target_name_or_path}` with lossless "
            "speculative decoding. The draft predicts the target's next tokens from the target's own last hidden "
            "state (one small decoder layer on `fc([embed(x_t+1); f_t])`)"
        )
    sections = [
        f"# {title}",
        what + ", optionally after an elastic compressor "
        "has reduced the visual tokens on the draft side. The target verifies every drafted token, so the "
        "output is exactly the target's (greedy: identical tokens; sampling: identical distribution).",
        "This repository holds **only the draft's weights**; the target's token embedding and `lm_head` are "
        "shared at load time, so the target model is required. Method: *SpecVLM: Fast Speculative Decoding in "
        "Vision-Language Models* (Huang et al., 2025, arXiv:2509.11815).",
        "\n".join(_draft_description(config)),
        "## Usage",
        usage_snippet(config, repo_id),
        "Without installing anything by hand, the Hub-hosted generation loop in `custom_generate/` does the "
        "same (it needs `specvlm_hf` installed and tells you so otherwise):\n\n"
        f'```python\nout = vlm.generate(**inputs, custom_generate="{repo_id}", trust_remote_code=True, '
        "max_new_tokens=256)\n```",
    ]
    if training:
        sections += [
            "## Training",
            "Online logit distillation from the frozen target "
            "(`0.1 * soft-CE(target probs, draft logits) + 1.0 * SmoothL1(draft feature, target next feature)`, "
            "response tokens only).\n\n"
            + "\n".join(["| Setting | Value |", "|---|---|"])
            + "\n"
            + "\n".join(f"| {key} | {_format_cell(value)} |" for key, value in training.items()),
        ]
    if records:
        sections += [
            "## Results",
            "Measured with `specvlm bench` (speedup: end-to-end wall time versus plain `generate` of the same "
            "target; mean accepted length: tokens committed per target forward).\n\n"
            + metrics_table(records),
        ]
    layout = "EAGLE-3 layout (exact)" if config.draft_architecture == "eagle3" else "EAGLE layout"
    sections += [
        "## Other formats",
        '`specvlm_hf.export_draft(draft, out_dir, format="speculators")` writes the weights in the vLLM '
        f"`speculators` {layout} (see that function's notes on what carries over).",
    ]
    content = f"---\n{card_data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n"
    return ModelCard(content)


# ------------------------------------------------------------------------------------------ custom_generate
CUSTOM_GENERATE_TEMPLATE = '''"""Hub-hosted generation loop for a SpecVLM draft (transformers `custom_generate`).

    out = vlm.generate(**inputs, custom_generate="{repo_id}", trust_remote_code=True, max_new_tokens=256)

transformers calls `generate(model=vlm, **generate_arguments)`. This loads the SpecVLM draft stored in this
repository, binds it to `vlm` and runs `vlm.generate(..., assistant_model=draft)`. The draft architecture and
the tree-verification loop live in the `{pip_name}` package, which must be installed.
"""

DRAFT_REPO = {repo_literal}
_DRAFTS = {{}}


def _load_draft(model):
    try:
        from specvlm_hf import SpecVLMDraftModel
    except ImportError as err:
        raise ImportError(
            "This repository's custom_generate needs the `{pip_name}` package, which holds the SpecVLM draft "
            "architecture and decoding loop. Install it with `pip install {pip_name}` and call generate again."
        ) from err
    key = id(model)
    if key not in _DRAFTS:
        _DRAFTS[key] = SpecVLMDraftModel.from_pretrained(DRAFT_REPO, target=model, dtype=model.dtype)
    return _DRAFTS[key]


def generate(model, *args, **kwargs):
    if kwargs.get("assistant_model") is None:
        kwargs["assistant_model"] = _load_draft(model)
    return model.generate(*args, **kwargs)
'''


def write_custom_generate(folder: str | Path, repo_id: str) -> Path:
    """Write `custom_generate/generate.py` and `requirements.txt` into `folder`; returns the subfolder."""
    out = Path(folder) / "custom_generate"
    out.mkdir(parents=True, exist_ok=True)
    (out / "generate.py").write_text(
        CUSTOM_GENERATE_TEMPLATE.format(repo_id=repo_id, repo_literal=json.dumps(repo_id), pip_name=PIP_NAME)
    )
    (out / "requirements.txt").write_text(f"{PIP_NAME}>={__version__}\ntransformers>=5.23\n")
    return out


# ------------------------------------------------------------------------------------------ save / push
def _check_draft_only(draft) -> None:
    vocab = draft.config.vocab_size
    for name, tensor in draft.state_dict().items():
        if name.startswith("draft_lm_head."):  # the draft's own reduced-vocabulary head (Vd, h)
            continue
        if tensor.dim() == 2 and vocab in tensor.shape and vocab != draft.config.hidden_size:
            raise ValueError(
                f"draft weight {name!r} {tuple(tensor.shape)} looks like a target embedding/lm_head; "
                "a SpecVLM draft must not carry target weights."
            )


def save_for_hub(
    draft,
    local_dir: str | Path,
    metrics: Any = None,
    *,
    repo_id: str | None = None,
    training: Mapping[str, Any] | None = None,
) -> Path:
    """Write the folder that `push_draft_to_hub` uploads: model.safetensors (draft weights only), config.json
    (records the target name and architecture), README.md (model card), custom_generate/.

    metrics: benchmark records (`specvlm bench` results.json) and/or a training dict; see `normalize_metrics`.
    repo_id: used in the card's usage snippet and by custom_generate (default: a placeholder).
    """
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    _check_draft_only(draft)
    draft.save_pretrained(local_dir, safe_serialization=True)
    card = build_model_card(draft, metrics, repo_id=repo_id, training=training)
    (local_dir / "README.md").write_text(str(card), encoding="utf-8")
    write_custom_generate(local_dir, repo_id or PLACEHOLDER_REPO)
    return local_dir


def push_draft_to_hub(
    draft,
    repo_id: str,
    *,
    metrics: Any = None,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    training: Mapping[str, Any] | None = None,
):
    """Create (or reuse) the Hub repo `repo_id` and upload the draft folder of `save_for_hub` in one commit.

    Returns the `huggingface_hub` commit info. The token only goes to `HfApi`; it is never logged or written.
    """
    api = HfApi(token=token)
    repo_url = api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
    repo_id = getattr(repo_url, "repo_id", None) or repo_id
    with tempfile.TemporaryDirectory(prefix="specvlm-push-") as tmp:
        folder = save_for_hub(draft, tmp, metrics, repo_id=repo_id, training=training)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            commit_message=commit_message
            or f"Upload SpecVLM draft for {draft.config.target_name_or_path} ({LIBRARY_NAME} {__version__})",
        )
    logger.info("Pushed SpecVLM draft to https://huggingface.co/%s", repo_id)
    return commit


__all__ = [
    "build_model_card",
    "export_draft",
    "metrics_table",
    "normalize_metrics",
    "push_draft_to_hub",
    "save_for_hub",
    "usage_snippet",
    "write_custom_generate",
]
