"""The demo's identity check: outputs compared in float32, timed in the timing dtype; exit status from float32."""

from __future__ import annotations

import pytest
import torch

from specvlm_hf.toy import demo, drafts
from tiny_models import make_inputs, make_tiny_target


class _Tok:  # the tiny targets have no processor
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(int(i)) for i in ids)


def test_compare_one_checks_a_float32_copy_and_times_bf16():
    vlm = make_tiny_target("llava")
    draft = drafts.new_draft(vlm)
    timed = demo.unrouted_copy(vlm).to(torch.bfloat16)
    twin = type(draft)(draft.config)
    twin.load_state_dict(draft.state_dict())
    twin = twin.to(torch.bfloat16).bind(timed)
    check = demo.float32_copy(timed, twin)
    assert (
        next(check[0].parameters()).dtype == torch.float32
        and next(timed.parameters()).dtype == torch.bfloat16
    )
    inputs = make_inputs("llava", vlm, seed=0)
    c = demo.compare_one(timed, twin, _Tok(), inputs, max_new_tokens=8, check=check, decoding_mode="tree")
    assert c.identical and c.timing_dtype == "bfloat16" and c.plain_tokens == 8
    assert c.timing_divergence is None or c.timing_divergence["position"] >= 0
    assert demo.demo_ok([c])


def _comparison(**kw):
    base = dict(
        question="q",
        plain_text="a b",
        spec_text="a b",
        plain_tokens=2,
        spec_tokens=2,
        plain_time_s=1.0,
        spec_time_s=0.5,
        identical=True,
        mean_accepted_length=2.0,
        target_forwards=2,
        timing_dtype="bfloat16",
    )
    return demo.Comparison(**{**base, **kw})


def test_ties_are_mentioned_only_where_bf16_differs_and_float32_is_identical(capsys):
    tie = {"position": 3, "plain_token": 5, "got_token": 6, "tie": True, "plain_logit": 1.0, "got_logit": 1.0}
    tie.update(top_logit=1.0, tolerance=0.01)
    same = _comparison()
    tied = _comparison(timing_identical=False, timing_divergence=tie)
    wrong = _comparison(identical=False, timing_identical=False, spec_text="a c")
    demo.print_comparison(1, 3, same)
    assert "identical: yes" in capsys.readouterr().out
    demo.print_comparison(2, 3, tied)
    out = capsys.readouterr().out
    assert "identical: yes" in out and "bfloat16 timing run differs: a numerical tie" in out
    demo.print_comparison(3, 3, wrong)
    out = capsys.readouterr().out
    assert "identical: no" in out and "tie" not in out
    assert demo.demo_ok([same, tied]) and not demo.demo_ok([same, wrong])
    demo.print_summary([same, tied])
    assert (
        "identical outputs: yes (2/2 in float32; 1 bfloat16 timing run(s) differ" in capsys.readouterr().out
    )
    demo.print_summary([same, wrong])
    assert "identical outputs: NO (1/2 in float32)" in capsys.readouterr().out


@pytest.mark.parametrize("identical", [True, False])
def test_demo_quick_exit_status_follows_the_float32_comparison(identical, monkeypatch, toy_cache_with_target):
    from specvlm_hf import cli

    tmp_path = toy_cache_with_target
    monkeypatch.setattr(demo, "load_or_train_draft", lambda vlm, *a, **k: (drafts.new_draft(vlm), None, {}))
    seen = []

    def fake_compare(vlm, draft, processor, inputs, max_new_tokens, check=None, **kw):
        seen.append(check)
        return _comparison(identical=identical, timing_identical=identical)

    monkeypatch.setattr(demo, "compare_one", fake_compare)
    args = cli.build_parser().parse_args(
        ["demo", "--quick", "--time-on", "tiny", "--cache-dir", str(tmp_path), "--max-new-tokens", "4"]
    )
    assert demo.run_demo(args) == (0 if identical else 1)
    assert len(seen) == 2
