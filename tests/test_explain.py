"""explain(): reported facts against each zoo config, golden reports, and failures as report entries."""

import os
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

import autocal
from autocal.testing import zoo

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "explain" / f"transformers-{transformers.__version__}"
GOLDEN_ARCHITECTURES = ["qwen3_moe", "deepseek_v3", "gpt_oss", "llama4", "mixtral", "nllb-moe"]


@pytest.mark.parametrize("name", GOLDEN_ARCHITECTURES)
def test_golden_report(name):
    """Regenerate with: AUTOCAL_ACCEPT=1 python -m pytest tests/test_explain.py -k golden"""
    text = str(autocal.explain(zoo.build_model(name)))
    path = GOLDEN / f"{name}.txt"
    if os.environ.get("AUTOCAL_ACCEPT"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("# auto-generated — regenerate with: AUTOCAL_ACCEPT=1 python -m pytest tests/test_explain.py"
                        " -k golden\n" + text + "\n")
    assert path.exists(), f"no golden report for {name} with transformers {transformers.__version__}"
    assert text + "\n" == path.read_text().split("\n", 1)[1]


def _expected_experts_and_k(config):
    """What the config defines, read here (test side) to check what explain detected."""
    text = config.get_text_config(decoder=True)
    experts = next(getattr(text, a) for a in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
                   if isinstance(getattr(text, a, None), int))
    k = next(getattr(text, a) for a in ("num_experts_per_tok", "top_k_experts", "moe_topk", "moe_k", "num_selected_experts")
             if isinstance(getattr(text, a, None), int))
    return experts, k


@pytest.mark.parametrize("name", ["qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3", "gpt_oss", "olmoe", "glm4_moe",
                                  "granitemoe", "minimax", "hunyuan_v1_moe"])
def test_reports_the_configs_experts_and_k(name):
    model = zoo.build_model(name)
    block = autocal.explain(model).blocks[0]
    assert (block.num_experts, block.top_k) == _expected_experts_and_k(model.config)
    assert block.scoring in ("softmax", "sigmoid")


class _PackedButUnrouted(nn.Module):
    """Looks like experts (stacked weights) but the block never routes tokens to them."""

    def __init__(self):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(4, 8, 4))
        self.down_proj = nn.Parameter(torch.randn(4, 4, 4))

    def forward(self, hidden_states):
        return hidden_states * self.gate_up_proj.mean()


class Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.experts = _PackedButUnrouted()

    def forward(self, hidden_states):
        return self.experts(hidden_states)


def test_block_that_cannot_be_understood_is_a_report_entry():
    report = autocal.explain(Odd())
    assert not report.successful()
    entry = report.blocks[0]
    assert entry.failure["kind"] in autocal.errors.KINDS
    assert "MoECalibrationModule.register('Odd')" in str(report)


def test_no_moe_report_says_so():
    report = autocal.explain(nn.Sequential(nn.Linear(2, 2)))
    assert report.blocks == [] and str(report) == "No MoE block found."
