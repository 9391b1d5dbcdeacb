"""Configuration of a SpecVLM draft model.

A draft is always made for one target: the config records where it came from (target name, architecture,
family, sizes) so that `bind()` can refuse a wrong target with a clear message, and so a draft on the Hub
says which model it accelerates.
"""

from __future__ import annotations

from typing import Any

from packaging import version
from transformers import PretrainedConfig

from .._version import __version__

DRAFT_ARCHITECTURES = ("eagle", "eagle3")
DECODING_MODES = ("tree", "chain")
# (tree_top_k, tree_depth, tree_total_tokens): the paper's budget, filling unset fields of a fixed budget
PAPER_TREE_BUDGET = (10, 7, 60)
DEFAULT_CHAIN_TOKENS = 5  # chain length of a fixed budget when only the tree is set, and of exports
COMPRESSOR_MODES = (None, "select", "weighted", "concat", "prune", "pool", "conv", "resampler", "text_only")
COMPRESSOR_PRIMITIVES = ("prune", "pool", "conv", "resampler", "text_only")
PRUNE_SCORES = ("norm", "question", "random")


# what specvlm_hf < 0.2.0 wrote into every config as its default budget (tree_top_k, tree_depth, tree_total_tokens,
# num_draft_tokens); such a config loads with the automatic budget that replaced those defaults
LEGACY_DEFAULT_BUDGET = (10, 7, 60, 5)
AUTOMATIC_BUDGET_SINCE = "0.2.0"


def _legacy_default_budget(written_by: str | None, *budget) -> bool:
    if written_by is None or tuple(budget) != LEGACY_DEFAULT_BUDGET:
        return False
    try:
        return version.parse(written_by) < version.parse(AUTOMATIC_BUDGET_SINCE)
    except version.InvalidVersion:
        return False


class SpecVLMDraftConfig(PretrainedConfig):
    r"""Configuration for [`SpecVLMDraftModel`], an EAGLE-2 style draft with an optional elastic visual compressor.

    Build it with [`SpecVLMDraftConfig.from_target`] rather than by hand: it reads the sizes from the target.

    Args:
        hidden_size: width of the draft; equals the target's hidden size (the draft reads the target's features
            and shares its token embedding and `lm_head`).
        vocab_size: the target's text vocabulary (rows of its `lm_head`).
        num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim, intermediate_size, rms_norm_eps,
        rope_theta, max_position_embeddings: the draft decoder (default: the target's head dims, 1 layer).
        draft_architecture: "eagle" (default: SpecVLM's EAGLE-2 draft, `RMSNorm(fc([embed ; f]))` into a Llama
            layer) or "eagle3" (the EAGLE-3 draft of vLLM `speculators`: `fc` projects the fused target layers to
            one feature g, the first layer's attention reads `[norm(embed) ; norm(g)]` and its residual stream
            starts at g; exports exactly with `export_draft(..., format="speculators")`). See
            `modeling_specvlm.py`.
        target_layers: which target features feed the draft. `[-1]` (default) is the target's last hidden state
            after its final norm (the input of `lm_head`); a longer list (indices into the target's
            `hidden_states`, e.g. `[2, 16, -1]`) fuses several layers EAGLE-3 style. `from_target` with
            `draft_architecture="eagle3"` defaults to EAGLE-3's `[2, L // 2, L - 3]` of an L-layer target (when
            those are three distinct layers; `[-1]` otherwise).
        image_token_ids: the target's image/video placeholder token ids.
        target_name_or_path, target_architecture, target_model_type, target_family: provenance, checked by `bind`.
        decoding_mode: "tree" (EAGLE-2 dynamic tree, default) or "chain".
        tree_top_k, tree_depth, tree_total_tokens: dynamic tree budget. None (default): chosen per step for the
            hardware at hand from measured target costs and the draft's probabilities (`generation/budget.py`);
            any of them set (here or per `generate` call): a fixed budget, the unset ones from the paper's GPU
            budget (`PAPER_TREE_BUDGET`: top_k 10, depth 7, 60 tokens).
        num_draft_tokens: chain length (max tokens drafted per step in chain mode); None: chosen like the tree.
        draft_confidence_threshold: chain mode stops drafting when the draft's top probability drops below it.
        draft_vocab_size: optional reduced draft vocabulary (EAGLE-3 style); None = full target vocabulary.
        compressor_mode: None (plain EagleVLM), "select", "weighted", "concat", or one fixed primitive
            ("prune", "pool", "conv", "resampler", "text_only").
        compressor_primitives: primitives the gate chooses among in "select" mode.
        compressor_prune_ratio, compressor_pool_kernel, compressor_conv_ratio, compressor_resampler_queries,
        compressor_prune_score, compressor_cost_weight, compressor_gumbel_tau: compressor settings.
        specvlm_hf_version: library version that wrote the config.
    """

    model_type = "specvlm_draft"

    def __init__(
        self,
        hidden_size: int = 4096,
        vocab_size: int = 32000,
        num_hidden_layers: int = 1,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        intermediate_size: int = 11008,
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 10000.0,
        max_position_embeddings: int = 8192,
        attention_bias: bool = False,
        draft_architecture: str = "eagle",
        target_layers: list[int] | None = None,
        image_token_ids: list[int] | None = None,
        target_name_or_path: str | None = None,
        target_architecture: str | None = None,
        target_model_type: str | None = None,
        target_family: str | None = None,
        decoding_mode: str = "tree",
        tree_top_k: int | None = None,
        tree_depth: int | None = None,
        tree_total_tokens: int | None = None,
        num_draft_tokens: int | None = None,
        draft_confidence_threshold: float = 0.0,
        draft_vocab_size: int | None = None,
        compressor_mode: str | None = None,
        compressor_primitives: list[str] | None = None,
        compressor_prune_ratio: float = 16.0,
        compressor_pool_kernel: int = 4,
        compressor_conv_ratio: int = 3,
        compressor_resampler_queries: int = 2,
        compressor_prune_score: str = "norm",
        compressor_cost_weight: float = 0.01,
        compressor_gumbel_tau: float = 1.0,
        specvlm_hf_version: str | None = None,
        **kwargs: Any,
    ):
        self.hidden_size = hidden_size
        self.vocab_size = vocab_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = (
            num_key_value_heads if num_key_value_heads is not None else num_attention_heads
        )
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.intermediate_size = intermediate_size
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.attention_bias = attention_bias
        self.draft_architecture = draft_architecture
        self.target_layers = list(target_layers) if target_layers is not None else [-1]
        self.image_token_ids = list(image_token_ids) if image_token_ids is not None else []
        self.target_name_or_path = target_name_or_path
        self.target_architecture = target_architecture
        self.target_model_type = target_model_type
        self.target_family = target_family
        self.decoding_mode = decoding_mode
        if _legacy_default_budget(
            specvlm_hf_version, tree_top_k, tree_depth, tree_total_tokens, num_draft_tokens
        ):
            tree_top_k = tree_depth = tree_total_tokens = num_draft_tokens = None
        self.tree_top_k = tree_top_k
        self.tree_depth = tree_depth
        self.tree_total_tokens = tree_total_tokens
        self.num_draft_tokens = num_draft_tokens
        self.draft_confidence_threshold = draft_confidence_threshold
        self.draft_vocab_size = draft_vocab_size
        self.compressor_mode = compressor_mode
        self.compressor_primitives = (
            list(compressor_primitives) if compressor_primitives is not None else list(COMPRESSOR_PRIMITIVES)
        )
        self.compressor_prune_ratio = compressor_prune_ratio
        self.compressor_pool_kernel = compressor_pool_kernel
        self.compressor_conv_ratio = compressor_conv_ratio
        self.compressor_resampler_queries = compressor_resampler_queries
        self.compressor_prune_score = compressor_prune_score
        self.compressor_cost_weight = compressor_cost_weight
        self.compressor_gumbel_tau = compressor_gumbel_tau
        self.specvlm_hf_version = specvlm_hf_version or __version__
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
        self.validate()

    @property
    def num_fused_layers(self) -> int:
        return len(self.target_layers)

    @property
    def fused_size(self) -> int:
        """Width of one fused draft input row: h ("eagle"), or 2h for the `[embed ; g]` rows of "eagle3"."""
        return 2 * self.hidden_size if self.draft_architecture == "eagle3" else self.hidden_size

    def to_diff_dict(self) -> dict[str, Any]:
        """What `save_pretrained` writes. `draft_architecture` only when it is not the default "eagle", so configs
        written before the option existed (e.g. `hub_configs/`) re-save byte for byte; loading fills the default."""
        out = super().to_diff_dict()
        if out.get("draft_architecture") == "eagle":
            del out["draft_architecture"]
        return out

    def validate(self) -> None:
        """Raise `ValueError` naming the first invalid field and its value."""

        def bad(field: str, value: Any, expected: str) -> ValueError:
            return ValueError(f"SpecVLMDraftConfig: invalid {field}={value!r}; expected {expected}.")

        for field in (
            "hidden_size",
            "vocab_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
        ):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise bad(field, value, "a positive integer")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise bad(
                "num_key_value_heads",
                self.num_key_value_heads,
                f"a divisor of num_attention_heads={self.num_attention_heads}",
            )
        if self.draft_architecture not in DRAFT_ARCHITECTURES:
            raise bad("draft_architecture", self.draft_architecture, f"one of {DRAFT_ARCHITECTURES}")
        if not self.target_layers or not all(isinstance(i, int) for i in self.target_layers):
            raise bad("target_layers", self.target_layers, "a non-empty list of target hidden-state indices")
        if self.decoding_mode not in DECODING_MODES:
            raise bad("decoding_mode", self.decoding_mode, f"one of {DECODING_MODES}")
        for field in ("tree_top_k", "tree_depth", "tree_total_tokens", "num_draft_tokens"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise bad(field, value, "None (automatic) or an integer >= 1")
        if None not in (self.tree_total_tokens, self.tree_depth) and self.tree_total_tokens < self.tree_depth:
            raise bad("tree_total_tokens", self.tree_total_tokens, f"at least tree_depth={self.tree_depth}")
        if not 0.0 <= self.draft_confidence_threshold < 1.0:
            raise bad("draft_confidence_threshold", self.draft_confidence_threshold, "a float in [0, 1)")
        if self.draft_vocab_size is not None and not (0 < self.draft_vocab_size <= self.vocab_size):
            raise bad(
                "draft_vocab_size",
                self.draft_vocab_size,
                f"None or an integer in [1, vocab_size={self.vocab_size}]",
            )
        if self.compressor_mode not in COMPRESSOR_MODES:
            raise bad("compressor_mode", self.compressor_mode, f"one of {COMPRESSOR_MODES}")
        unknown = [p for p in self.compressor_primitives if p not in COMPRESSOR_PRIMITIVES]
        if unknown or not self.compressor_primitives:
            raise bad(
                "compressor_primitives",
                self.compressor_primitives,
                f"a non-empty subset of {COMPRESSOR_PRIMITIVES}",
            )
        if self.compressor_prune_ratio < 1:
            raise bad("compressor_prune_ratio", self.compressor_prune_ratio, "a number >= 1")
        for field in ("compressor_pool_kernel", "compressor_conv_ratio", "compressor_resampler_queries"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise bad(field, value, "an integer >= 1")
        if self.compressor_prune_score not in PRUNE_SCORES:
            raise bad("compressor_prune_score", self.compressor_prune_score, f"one of {PRUNE_SCORES}")
        if self.compressor_cost_weight < 0:
            raise bad("compressor_cost_weight", self.compressor_cost_weight, "a number >= 0")
        if self.compressor_gumbel_tau <= 0:
            raise bad("compressor_gumbel_tau", self.compressor_gumbel_tau, "a number > 0")

    @classmethod
    def from_target(cls, target, **overrides: Any) -> SpecVLMDraftConfig:
        """Build a draft config sized for `target` (a transformers VLM or causal LM, PEFT-wrapped or not).

        Any config field can be overridden, e.g. `from_target(vlm, compressor_mode="select", num_hidden_layers=2)`.
        """
        from ..targets import families as targets

        model = targets.unwrap_target(target)
        spec = targets.get_target_spec(model)
        dims = targets.target_head_dims(model)
        hidden = targets.target_hidden_size(model)
        values: dict[str, Any] = {
            "hidden_size": hidden,
            "vocab_size": targets.target_vocab_size(model),
            "num_hidden_layers": 1,
            "num_attention_heads": dims["num_attention_heads"],
            "num_key_value_heads": dims["num_key_value_heads"],
            "head_dim": dims["head_dim"],
            "intermediate_size": dims["intermediate_size"],
            "rms_norm_eps": dims["rms_norm_eps"],
            "rope_theta": dims["rope_theta"],
            "max_position_embeddings": dims.get("max_position_embeddings", 8192),
            "image_token_ids": targets.image_token_ids(model),
            "target_name_or_path": getattr(model.config, "_name_or_path", None)
            or getattr(model, "name_or_path", None),
            "target_architecture": type(model).__name__,
            "target_model_type": model.config.model_type,
            "target_family": spec.family,
        }
        text_cfg = targets.text_config(model)
        for token_field in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(text_cfg, token_field, None)
            if value is None:
                value = getattr(model.config, token_field, None)
            if value is not None:
                values[token_field] = value
        if overrides.get("draft_architecture") == "eagle3" and "target_layers" not in overrides:
            # EAGLE-3's default layers (low, middle, high), as vLLM `speculators` picks them
            n_layers = targets.target_num_layers(model)
            layers = [2, n_layers // 2, n_layers - 3]
            if layers[0] < layers[1] < layers[2]:
                values["target_layers"] = layers
        values.update(overrides)
        return cls(**values)
