"""explain(): reported facts against each zoo config, golden reports, and failures as report entries."""

import re
import sys
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

import autocal
from autocal.integrations.transformers import eager_experts
from autocal.testing import zoo
from autocal.testing.golden import compare_golden
from autocal.testing.patterns import NoRuleMatches
from autocal.testing.toy_moe import ToyMoEConfig, make_toy_block

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for test_zoo.KNOWN_FAILURES
GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "explain" / f"transformers-{transformers.__version__}"
GOLDEN_ARCHITECTURES = ["qwen3_moe", "deepseek_v3", "gpt_oss", "llama4", "mixtral", "nllb-moe"]


# The calibration-on difference is float rounding: its figure depends on which BLAS kernels the CPU
# runs (0 with AVX-512, 7e-07 with AVX2 alone), so golden texts hold a placeholder and the figure is
# checked against the verification's tolerance instead.
ROUNDING = re.compile(r"(?<= on=)\S+")


def rounding_free(report) -> str:
    """The report's text, each calibration-on difference replaced by ``<rounding>`` once it is within tolerance."""
    for block in report.blocks:
        if block.verification:
            assert block.verification["passed"], f"{block.block_class}: {block.verification}"
    return ROUNDING.sub("<rounding>", str(report))


@pytest.mark.parametrize("name", GOLDEN_ARCHITECTURES)
def test_golden_report(name):
    """Regenerate with: AUTOCAL_ACCEPT=1 python -m pytest tests/test_explain.py -k golden"""
    text = rounding_free(autocal.explain(zoo.build_model(name)))
    compare_golden(GOLDEN / f"{name}.txt", text, "python -m pytest tests/test_explain.py -k golden")


def test_golden_texts_hold_no_rounding_figure():
    """A golden text that held one CPU's rounding would fail on another CPU (AVX2 against AVX-512)."""
    figures = [(path.name, figure) for path in GOLDEN.glob("*.txt") for figure in ROUNDING.findall(path.read_text())]
    assert figures and all(figure == "<rounding>" for _, figure in figures), figures


# Test-side knowledge of where each config keeps its expert count and k (autocal itself reads no config).
_EXPERTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
_K = ("num_experts_per_tok", "top_k_experts", "moe_topk", "moe_k", "num_selected_experts", "moe_top_k", "top_k")
# top-1 / top-2 routers with no k in the config; ViTPose picks one expert per sample by dataset index
_K_BY_DESIGN = {"switch_transformers": 1, "nllb-moe": 2, "vitpose_backbone": 1}


def _first_int(configs, names):
    return next(getattr(c, a) for c in configs for a in names if isinstance(getattr(c, a, None), int))


def _expected_experts_and_k(name, config):
    text = config.get_text_config(decoder=True)
    configs = [text, *(getattr(text, sub) for sub in ("ffn_config",) if hasattr(text, sub))]
    k = _K_BY_DESIGN.get(name) or _first_int(configs, _K)
    return _first_int(configs, _EXPERTS), k


def _zoo_params():
    from test_zoo import KNOWN_FAILURES, UNBUILDABLE

    # JetMoE's MLP experts are detected and reported (its attention experts are a failure entry); Doge's
    # entry is a failure that still reports its router (k of the experts it chooses among) from the recording.
    failures = {name: reason for name, reason in KNOWN_FAILURES.items() if name not in ("jetmoe", "doge")}
    for name in zoo.moe_architectures():
        if name in UNBUILDABLE:
            continue
        marks = [pytest.mark.xfail(reason=failures[name], strict=True)] if name in failures else []
        yield pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("name", list(_zoo_params()))
def test_reports_the_configs_experts_and_k(name):
    model = zoo.build_model(name)
    report = autocal.explain(model, verify=False, example_inputs=zoo.example_inputs(model),
                             forward=zoo.forward_module(model))
    block = next(b for b in report.blocks if b.structure)
    experts, k = _expected_experts_and_k(name, model.config)
    assert block.num_experts == experts
    if name == "nllb-moe":  # capacity and its second-expert policy may drop a token's second expert
        assert 1 <= block.top_k <= k
    else:
        assert block.top_k == k
    assert block.scoring, "the scoring function the code applies"


def test_block_that_cannot_be_understood_is_a_report_entry():
    report = autocal.explain(NoRuleMatches())
    assert not report.successful()
    entry = report.blocks[0]
    assert entry.failure["kind"] in autocal.errors.KINDS
    assert "MoECalibrationModule.register('NoRuleMatches')" in str(report)


def test_no_moe_report_says_so():
    report = autocal.explain(nn.Sequential(nn.Linear(2, 2)))
    assert report.blocks == [] and str(report) == "No MoE block found."


class _MergedExperts(nn.Module):
    """SMEAR-style: the experts' weights averaged by the router's scores of each sequence, one merged MLP run on
    every token; a candidate (a list of experts beside a router) that routes no token anywhere."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(8, 4, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(8, 12), nn.GELU(), nn.Linear(12, 8)) for _ in range(4))

    def forward(self, x):
        scores = self.router(x.mean(dim=1)).softmax(dim=-1)[0]  # the first sequence's, for brevity
        merged = {name: sum(s * dict(e.named_parameters())[name] for s, e in zip(scores, self.experts))
                  for name, _ in self.experts[0].named_parameters()}
        return torch.func.functional_call(self.experts[0], merged, (x,))


def test_no_moe_report_names_the_candidates_ruled_out_and_why():
    report = autocal.explain(nn.Sequential(_MergedExperts()))
    assert report.blocks == [] and str(report).splitlines()[:2] == ["No MoE block found.", "Ruled out:"]
    assert len(report.ruled_out) == 1 and report.ruled_out[0].startswith("_MergedExperts at `0`: ")
    assert report.to_dict()["ruled_out"] == report.ruled_out


def test_table_in_a_terminal_plain_text_when_piped(monkeypatch):
    report = autocal.explain(make_toy_block(ToyMoEConfig(num_experts=4, top_k=2)))
    table = report.render(table=True)
    lines = table.splitlines()
    assert lines[1].startswith("┌") and lines[-1].startswith("└")
    assert len({len(line) for line in lines[1:]}) == 1, "every table line has the same width"
    assert any("│ top_k " in line and "2 of 4" in line for line in lines)
    monkeypatch.setattr("sys.stdout.isatty", lambda: False)
    assert report.render() == str(report) and "┌" not in str(report)
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    assert report.render() == table


def test_table_wraps_to_the_terminal_width():
    from autocal.explain import _format_table

    report = autocal.explain(make_toy_block(ToyMoEConfig(num_experts=4, top_k=2)))
    narrow = _format_table(report.blocks[0], width=70).splitlines()
    assert all(len(line) <= 70 for line in narrow[1:])
    assert "down_proj" in "".join(narrow), "wrapping keeps every fact"


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm"])
def test_the_experts_implementation_is_named_and_bitwise_holds_against_eager(implementation):
    """transformers' default experts implementation is grouped_mm (from_config and from_pretrained), whose
    kernels round otherwise than the eager loop that autocal's modules compute as: explain says so."""
    model = zoo.build_model("qwen3_moe", experts_implementation=implementation)
    with torch.no_grad(), eager_experts(model):
        eager_logits = model(**zoo.example_inputs(model)).logits
    report = autocal.explain(model)
    verification = report.blocks[0].verification
    assert verification["experts_implementation"] == implementation
    assert verification["bitwise_off_eager"] is True
    assert f"experts impl:    {implementation}  bitwise(off) against eager=True" in str(report)
    autocal.convert(model, calibrate_all_experts=False)
    with torch.no_grad():  # the whole model, as the eager experts compute it
        assert torch.equal(model(**zoo.example_inputs(model)).logits, eager_logits)


def test_eager_experts_need_no_word_on_the_implementation():
    report = autocal.explain(zoo.build_model("qwen3_moe"))
    verification = report.blocks[0].verification
    assert verification["experts_implementation"] == "eager"
    assert verification["bitwise_off_eager"] == verification["bitwise_off"] is True
    assert "experts impl" not in str(report)


@pytest.mark.parametrize("name, grouped", [("group_limited", True), ("hierarchical", True), ("gshard_top2", False),
                                           ("switch_top1", False), ("megatron_grouped", False)])
def test_groups_are_said_only_of_group_limited_routing(name, grouped):
    """``groups`` says whether the routing picks groups of experts before experts (a selection over fewer choices
    first): not of GShard's second choice among the experts left, nor of scores kept ``[batch, seq, E]``."""
    from autocal.testing.corpus import ENTRIES, Holder

    report = autocal.explain(Holder(ENTRIES[name].build(0)), verify=False)
    assert report.blocks[0].structure["router"]["grouped"] is grouped


class _DoubleRouterMoE(nn.Module):
    """The router's product in the block's own code, in float64: ``F.linear(x.double(), self.gate.weight.double())``."""

    def __init__(self):
        super().__init__()
        from autocal.testing.corpus import ENTRIES

        reference = ENTRIES["mixtral_reference"].build(0)
        self.gate, self.experts = reference.gate, reference.experts

    def route(self, t):
        logits = nn.functional.linear(t.double(), self.gate.weight.double())
        weights, selected = torch.topk(logits.softmax(dim=-1), 2)
        return (weights / weights.sum(-1, keepdim=True)).to(t.dtype), selected

    def forward(self, x):
        t = x.reshape(-1, x.shape[-1])
        weights, selected = self.route(t)
        out = torch.zeros_like(t)
        for i, expert in enumerate(self.experts):
            rows, slot = torch.where(selected == i)
            out[rows] += weights[rows, slot, None] * expert(t[rows])
        return out.view_as(x)


def test_a_router_weight_read_in_the_blocks_own_code_is_the_router_not_a_shared_module():
    from autocal.testing.corpus import Holder

    structure = autocal.explain(Holder(_DoubleRouterMoE()), verify=False).blocks[0].structure
    assert structure["router"]["module_path"] == "gate"
    assert "gate" not in structure["shared_modules"]


def test_a_capacity_top_k_over_the_tokens_is_not_the_routers_k():
    """A top-1 gate whose experts keep their tokens by a top-k over the tokens (``dim=0``) routes each token to 1."""
    from autocal.testing.corpus import ENTRIES

    report = autocal.explain(ENTRIES["variadic_forward"].build(0), verify=False)
    assert (report.blocks[0].structure["router"]["top_k"], report.blocks[0].structure["router"]["num_choices"]) == (1, 6)


class _SoftCappedMoE(_DoubleRouterMoE):
    """Logits soft-capped by ``tanh`` before the softmax (Grok's routers): the softmax scores them."""

    def route(self, t):
        return torch.topk((30 * torch.tanh(self.gate(t) / 30)).softmax(dim=-1), 2)


def test_the_scoring_is_the_softmax_after_a_soft_cap():
    from autocal.testing.corpus import Holder

    router = autocal.explain(Holder(_SoftCappedMoE()), verify=False).blocks[0].structure["router"]
    assert (router["scoring"], router["selection"]) == ("softmax", "topk")
