"""Hub folder, push (HfApi mocked at the network boundary), model card, custom_generate, speculators export."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import HfApi
from safetensors import safe_open
from transformers import AutoModel

import specvlm_hf
from specvlm_hf import SpecVLMDraftConfig, SpecVLMDraftModel
from specvlm_hf.sharing.export import export_draft, speculators_weight_name
from specvlm_hf.sharing.hub import (
    normalize_metrics,
    push_draft_to_hub,
    save_for_hub,
)

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_SECRETtokenDONOTLEAK1234567890"
BENCH = [
    {
        "method": "specvlm-tree",
        "temperature": 0.0,
        "speedup": 2.61,
        "mean_accepted_length": 3.84,
        "tokens_per_second": 41.5,
        "lossless": True,
    },
    {
        "method": "specvlm-tree",
        "temperature": 1.0,
        "speedup": 2.1,
        "mean_accepted_length": 3.1,
        "tokens_per_second": 33.0,
        "lossless": True,
        "hardware": "1x H200",
    },
]


@pytest.fixture
def draft() -> SpecVLMDraftModel:
    torch.manual_seed(0)
    return SpecVLMDraftModel(
        SpecVLMDraftConfig(
            hidden_size=32,
            num_attention_heads=4,
            intermediate_size=64,
            vocab_size=100,
            target_name_or_path="org/tiny-llava",
            target_architecture="LlavaForConditionalGeneration",
            target_model_type="llava",
            target_family="llava",
        )
    )


def _front_matter(readme: str) -> dict:
    assert readme.startswith("---\n")
    return yaml.safe_load(readme.split("---\n")[1])


def _all_text(folder: Path) -> str:
    return "\n".join(p.read_bytes().decode("latin-1") for p in folder.rglob("*") if p.is_file())


def test_save_for_hub_folder(draft, tmp_path):
    folder = save_for_hub(draft, tmp_path / "hub", metrics=BENCH, repo_id="org/tiny-llava-specvlm")
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert files == [
        "README.md",
        "config.json",
        "custom_generate/generate.py",
        "custom_generate/requirements.txt",
        "model.safetensors",
    ]
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys == set(draft.state_dict())
    assert not any("embed" in k or "lm_head" in k for k in keys)

    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "specvlm_draft"
    assert config["target_name_or_path"] == "org/tiny-llava"
    assert config["target_architecture"] == "LlavaForConditionalGeneration"
    assert config["specvlm_hf_version"] == specvlm_hf.__version__

    readme = (folder / "README.md").read_text()
    meta = _front_matter(readme)
    assert meta["base_model"] == "org/tiny-llava"
    assert meta["library_name"] == "specvlm_hf"
    assert meta["pipeline_tag"] == "image-text-to-text"
    assert {"speculative-decoding", "eagle", "specvlm"} <= set(meta["tags"])
    assert (
        "| Method | Temperature | Mean accepted length | Speedup | Tokens/s | Lossless | Hardware |" in readme
    )
    assert "| specvlm-tree | 0.00 | 3.84 | 2.61 | 41.50 | yes | - |" in readme
    assert "1x H200" in readme
    assert 'SpecVLMDraftModel.from_pretrained("org/tiny-llava-specvlm", target=vlm' in readme
    assert "assistant_model=draft" in readme and "import specvlm_hf" in readme

    generate_py = (folder / "custom_generate" / "generate.py").read_text()
    assert 'DRAFT_REPO = "org/tiny-llava-specvlm"' in generate_py
    compile(generate_py, "generate.py", "exec")
    assert "specvlm_hf>=" in (folder / "custom_generate" / "requirements.txt").read_text()


def test_card_without_metrics_has_no_results_table(draft, tmp_path):
    readme = (save_for_hub(draft, tmp_path) / "README.md").read_text()
    assert "## Results" not in readme and "## Training" not in readme
    assert _front_matter(readme)["base_model"] == "org/tiny-llava"


def test_training_and_hardware_from_metrics_dict(draft, tmp_path):
    metrics = {"results": BENCH[:1], "hardware": "1x A100", "training": {"epochs": 5, "dataset": "llava-mix"}}
    readme = (save_for_hub(draft, tmp_path, metrics=metrics) / "README.md").read_text()
    assert "## Training" in readme and "| epochs | 5 |" in readme and "| dataset | llava-mix |" in readme
    assert "| specvlm-tree | 0.00 | 3.84 | 2.61 | 41.50 | yes | 1x A100 |" in readme


def test_normalize_metrics_forms():
    assert normalize_metrics(None) == ([], {})
    assert normalize_metrics(BENCH)[0] == BENCH
    assert normalize_metrics(BENCH[0]) == ([BENCH[0]], {})
    with pytest.raises(TypeError):
        normalize_metrics("results.json")


def test_reload_with_automodel(draft, tmp_path):
    folder = save_for_hub(draft, tmp_path)
    loaded = AutoModel.from_pretrained(folder)
    assert isinstance(loaded, SpecVLMDraftModel)
    for name, tensor in draft.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_custom_generate_loads_through_transformers(draft, tmp_path, monkeypatch):
    from transformers import GenerationMixin

    folder = save_for_hub(draft, tmp_path, repo_id="org/tiny-llava-specvlm")
    generate = GenerationMixin.load_custom_generate(None, str(folder), trust_remote_code=True)
    assert callable(generate) and generate.__name__ == "generate"
    # Without specvlm_hf installed, the user is told what to install.
    monkeypatch.setitem(sys.modules, "specvlm_hf", None)
    with pytest.raises(ImportError, match="pip install specvlm_hf"):
        generate(model=object())


def test_push_uses_one_upload_with_the_folder(draft, monkeypatch, caplog, capsys):
    calls = {}

    def fake_create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = {"repo_id": repo_id, **kwargs, "token": self.token}
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def fake_upload_folder(self, *, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        calls.setdefault("upload_folder", []).append(
            {
                "repo_id": repo_id,
                "files": sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()),
                "text": _all_text(folder),
                **kwargs,
            }
        )
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", fake_upload_folder)
    caplog.set_level(logging.DEBUG)
    result = push_draft_to_hub(draft, "org/tiny-draft", metrics=BENCH, private=True, token=TOKEN)

    assert result == "commit-info"
    assert calls["create_repo"]["repo_id"] == "org/tiny-draft"
    assert calls["create_repo"]["private"] is True and calls["create_repo"]["exist_ok"] is True
    assert calls["create_repo"]["token"] == TOKEN  # the token reaches HfApi ...
    (upload,) = calls["upload_folder"]  # ... in exactly one commit
    assert upload["repo_id"] == "org/tiny-draft"
    assert {"model.safetensors", "config.json", "README.md", "custom_generate/generate.py"} <= set(
        upload["files"]
    )
    assert "org/tiny-draft" in upload["text"]
    # ... and nowhere else: not in any uploaded file, log record or console output.
    assert TOKEN not in upload["text"]
    assert TOKEN not in caplog.text
    captured = capsys.readouterr()
    assert TOKEN not in captured.out and TOKEN not in captured.err


def test_export_of_an_eagle_draft_is_refused(draft, tmp_path):
    """The "eagle" layout drops the draft's fusion RMSNorm: it would compute a different function."""
    with pytest.raises(ValueError, match=r"different function.*draft_architecture='eagle3'.*--servable"):
        export_draft(draft, tmp_path / "spec", format="speculators")
    assert not (tmp_path / "spec").exists()


def test_export_speculators_fields(draft, tmp_path):
    out = export_draft(draft, tmp_path / "spec", format="speculators", allow_inexact=True)
    config = json.loads((out / "config.json").read_text())
    assert config["speculators_model_type"] == "eagle"
    assert config["architectures"][0] == "EagleSpeculator"
    assert config["transformer_layer_architecture"] == "LlamaDecoderLayer"
    layer = config["transformer_layer_config"]
    assert layer["model_type"] == "llama" and layer["hidden_size"] == 32 and layer["num_hidden_layers"] == 1
    assert layer["vocab_size"] == 100 and layer["intermediate_size"] == 64 and layer["head_dim"] == 8
    assert config["layernorms"] is True and config["fusion_bias"] is False
    spec = config["speculators_config"]
    assert spec["algorithm"] == "eagle"
    assert spec["default_proposal_method"] in [m["proposal_type"] for m in spec["proposal_methods"]]
    assert spec["verifier"] == {
        "name_or_path": "org/tiny-llava",
        "architectures": ["LlavaForConditionalGeneration"],
    }
    assert config["specvlm"]["fusion_layernorm"] is True
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"fusion_fc.weight", "fusion_layernorm.weight", "pre_lm_head_layernorm.weight"} <= keys
    assert "transformer.self_attn.q_proj.weight" in keys and "transformer.mlp.down_proj.weight" in keys
    assert not any(k.startswith(("fc.", "layers.", "compressor.", "embed", "lm_head")) for k in keys)
    readme = (out / "README.md").read_text()
    assert "compressor" in readme and "dropped" in readme


def test_eagle3_card_and_default_card(draft, tmp_path):
    default = (save_for_hub(draft, tmp_path / "default") / "README.md").read_text()
    assert "EAGLE-2 draft model" in default and "EAGLE-3" not in default
    assert "`speculators` EAGLE layout" in default
    eagle3 = SpecVLMDraftModel(
        SpecVLMDraftConfig(**{**draft.config.to_dict(), "draft_architecture": "eagle3"})
    )
    folder = save_for_hub(eagle3, tmp_path / "eagle3")
    readme = (folder / "README.md").read_text()
    assert "EAGLE-3 architecture" in readme and 'EAGLE-3 (`draft_architecture="eagle3"`)' in readme
    assert "`speculators` EAGLE-3 layout (exact)" in readme
    assert json.loads((folder / "config.json").read_text())["draft_architecture"] == "eagle3"


def test_export_drops_compressor_and_refuses_unmappable(draft):
    assert speculators_weight_name("compressor.gate.weight") is None
    assert speculators_weight_name("layers.0.mlp.up_proj.weight") == "transformer.mlp.up_proj.weight"
    draft.config.num_hidden_layers = 2
    with pytest.raises(ValueError, match="num_hidden_layers=2"):
        export_draft(draft, "/nonexistent", allow_inexact=True)
    with pytest.raises(ValueError, match="unknown format"):
        export_draft(draft, "/nonexistent", format="gguf")


@pytest.mark.slow
def test_speculators_export_loads_with_speculators():
    """Builds two venvs under /tmp (minutes the first time) and loads the exports with speculators itself: the
    "eagle3" exports with speculators 0.9.0's Eagle3DraftModel, whose forward must match the draft's (< 1e-4)."""
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "validate_speculators_export.sh")],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "OK: speculators export validated" in result.stdout
    assert "EAGLE-3 forward of speculators vs the SpecVLM eagle3 draft" in result.stdout
