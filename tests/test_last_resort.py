"""The rule of last resort (autocal/detect/last_resort.py, autocal/synthesize/last_resort.py).

Blocks whose dispatch no specialised rule reads, converted by forcing their routing choice: the output is the
original's (bitwise with calibration off), every expert Linear sees every token once, and the number of extra
forwards is the stated one. Blocks where forcing cannot give each expert the inputs the router gives it are refused
with a stated error. The specialised rules are checked against it: where both apply, both give the same output.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autocal
from autocal.detect.facts import Facts
from autocal.detect.last_resort import detect_last_resort
from autocal.detect.plans import LastResortPlan
from autocal.errors import AutocalError
from autocal.rules import decide
from autocal.synthesize.last_resort import build_last_resort
from autocal.testing.assertions import count_rows, expert_linears
from autocal.trace.inputs import BlockCall
from autocal.testing.patterns import PATTERNS, ScoredInputsMoE, SwiGLU, TwoLevelMoE
from autocal.testing.toy_moe import main_output
from autocal.verify import compare_outputs


def _inputs(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, seq, 16, generator=torch.Generator().manual_seed(seed))


def _check(original: nn.Module, module: nn.Module, x: torch.Tensor) -> None:
    """Off: bitwise. On: within tolerance, every expert Linear given each token once, and the output not zero."""
    tokens = x.numel() // x.shape[-1]
    with torch.no_grad():
        expected = main_output(original(x))
        module.calibrate_all_experts = False
        assert torch.equal(main_output(module(x)), expected)
        module.calibrate_all_experts = True
        linears = expert_linears(module)
        with count_rows(linears) as rows:
            on = main_output(module(x))
    assert expected.abs().max() > 0
    assert compare_outputs(expected, on)[2]
    assert linears and rows == {name: tokens for name in linears}, rows


@pytest.mark.parametrize("make", [ScoredInputsMoE, TwoLevelMoE, lambda: TwoLevelMoE(groups=2, per_group=3, k=2)],
                         ids=["scored_inputs", "two_level", "two_level_k2"])
@pytest.mark.parametrize("shape", [(1, 1), (2, 5), (1, 9)])
def test_every_expert_sees_every_token_and_the_output_is_the_originals(make, shape):
    torch.manual_seed(0)
    block = make().eval()
    module = autocal.synthesize(block)
    assert module.structure.level == "last-resort"
    _check(block, module, _inputs(*shape))


def test_calibration_costs_ceil_e_over_k_extra_forwards_for_one_top_k():
    torch.manual_seed(0)
    block = ScoredInputsMoE(experts=5, k=2).eval()
    module = autocal.synthesize(block)
    calls = []
    block_forward = type(block).forward
    module.__class__._block_forward = lambda self, *a, **k: calls.append(1) or block_forward(self, *a, **k)
    try:
        with torch.no_grad():
            module(_inputs(1, 4))
    finally:
        module.__class__._block_forward = block_forward
    assert len(module.plan.dispatch.runs) == math.ceil(5 / 2)
    assert len(calls) == 1 + math.ceil(5 / 2)


def test_two_level_gating_forces_both_choices():
    """A group by argmax, then k of its experts by top-k: one run per (group, group of k), both calls forced."""
    torch.manual_seed(0)
    plan = decide(TwoLevelMoE(groups=2, per_group=3, k=2).eval()).plan
    assert isinstance(plan, LastResortPlan)
    assert [len(run.choices) for run in plan.dispatch.runs] == [2] * 4  # 2 groups x ceil(3 / 2)
    assert sorted(e for run in plan.dispatch.runs for e in run.observed) == list(range(6))
    assert plan.structure.router.top_k == 2 and plan.structure.router.num_choices == 6


def test_an_input_scale_that_depends_on_the_other_chosen_expert_is_refused():
    """Softmax over the k chosen logits: forced beside another expert, an expert gets another input than the
    router gives it; the rule says so, at the block's line, instead of calibrating on wrong inputs."""
    torch.manual_seed(0)
    with pytest.raises(AutocalError) as caught:
        autocal.synthesize(ScoredInputsMoE(normalize=True).eval())
    error = caught.value
    assert error.kind == "unsupported-dispatch" and error.block_class == "ScoredInputsMoE"
    assert "not given the rows the real forward gives it" in str(error) and "rule last-resort;" in str(error)
    assert "patterns.py" in error.source
    assert any("register('ScoredInputsMoE')" in hint for hint in error.hints), "a next step"


class CappedScoresMoE(nn.Module):
    """Every expert on every token, scaled by its top-k score, but at most ``capacity`` tokens per expert."""

    def __init__(self, experts: int = 4, k: int = 2, capacity: int = 3) -> None:
        super().__init__()
        self.k, self.capacity = k, capacity
        self.router = nn.Linear(16, experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU() for _ in range(experts))

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        logits = self.router(flat)
        top, chosen = logits.topk(self.k, dim=-1)
        scores = torch.zeros_like(logits).scatter(-1, chosen, top.sigmoid())
        kept = (torch.cumsum((scores > 0).to(flat.dtype), dim=0) <= self.capacity).to(flat.dtype)
        scores = scores * kept
        return sum(expert(flat * scores[:, e, None]) for e, expert in enumerate(self.experts)).view_as(x)


def test_a_capacity_that_drops_forced_tokens_is_refused():
    torch.manual_seed(0)
    block = CappedScoresMoE().eval()
    with pytest.raises(AutocalError) as caught:
        autocal.synthesize(block)
    assert caught.value.kind == "unsupported-dispatch"
    assert "never gives expert(s) [0, 1, 2, 3] all" in str(caught.value)


class ChunkedMoE(nn.Module):
    """Tokens routed ``chunk`` at a time, a top-k per chunk; ``peak``: the forward also keeps the positions of the
    two tokens of largest norm (a statistic, another top-k call)."""

    def __init__(self, experts=5, k=2, chunk=3, peak=False):
        super().__init__()
        self.k, self.chunk, self.peak = k, chunk, peak
        self.router = nn.Linear(16, experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU() for _ in range(experts))

    def forward(self, x):
        flat, parts = x.reshape(-1, x.shape[-1]), []
        if self.peak:
            self.loudest = flat.norm(dim=-1).topk(min(2, flat.shape[0])).indices
        for part in flat.split(self.chunk):
            top, chosen = self.router(part).topk(self.k, dim=-1)
            weights, out = top.softmax(-1), torch.zeros_like(part)
            for e, expert in enumerate(self.experts):
                token, slot = torch.where(chosen == e)
                out.index_add_(0, token, expert(part[token]) * weights[token, slot, None])
            parts.append(out)
        return torch.cat(parts).view_as(x)


def test_a_top_k_per_chunk_is_forced_alike_in_every_chunk_on_any_number_of_chunks():
    """Forced one by one, 8 chunks of the made-up tokens would take 3^8 runs to probe; forced alike, 3 runs, and
    a batch of more chunks than detection saw gives every expert every token."""
    torch.manual_seed(0)
    block = ChunkedMoE().eval()
    module = autocal.synthesize(block)
    assert module.structure.level == "last-resort" and len(module.plan.dispatch.runs) == 3
    assert module.structure.router.top_k == 2 and not module.structure.router.grouped
    for shape in ((1, 1), (2, 5), (4, 11)):
        _check(block, module, _inputs(*shape))


def test_chunks_not_forced_alike_are_refused_saying_the_block_routes_part_by_part():
    torch.manual_seed(0)
    with pytest.raises(AutocalError) as caught:
        autocal.synthesize(ChunkedMoE(peak=True).eval())
    assert caught.value.kind == "unsupported-dispatch"
    assert "called in a loop at" in str(caught.value) and "routes its tokens part by part" in str(caught.value)


@pytest.mark.parametrize("name, draw", [("multinomial_routing", "multinomial"), ("noise_at_inference", "randn_like")])
def test_routing_drawn_at_random_is_refused_naming_the_draw(name, draw):
    """Experts chosen by sampling, or by scores with noise added at inference, route differently on every run: the
    error names the random call and its line in the block, not a failed forcing or a missing top-k."""
    pattern = PATTERNS[name]
    with pytest.raises(AutocalError) as caught:
        autocal.synthesize(pattern.make())
    assert caught.value.kind == "unsupported-dispatch"
    assert f"random numbers the forward draws ({draw})" in caught.value.explanation
    path, line = caught.value.source.rsplit(":", 1)
    assert path.endswith("patterns.py")
    with open(path) as source:
        assert draw in source.read().splitlines()[int(line) - 1]


def test_experts_run_by_their_forward_method_are_refused_saying_how_to_call_them():
    """``expert.forward(rows)`` runs the expert's weights but no module call: the error says so, not that the
    forward never calls the experts (a no-moe-block error)."""
    with pytest.raises(AutocalError) as caught:
        autocal.synthesize(PATTERNS["direct_forward_calls"].make())
    assert caught.value.kind == "unsupported-dispatch"
    assert "runs the modules in `experts` through a method" in caught.value.explanation
    assert "call the experts as modules: `expert(x)`" in caught.value.hints[0]


class _AdapterExpert(nn.Module):
    def __init__(self):
        super().__init__()
        self.down, self.up = nn.Linear(16, 4, bias=False), nn.Linear(4, 16, bias=False)

    def lora_forward(self, base, x):
        return base + self.up(self.down(x))


class _MethodCalledExpertsMoE(nn.Module):
    """Experts used through a method of another name (MixLoRA style), their Linears called as modules."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(16, 4, bias=False)
        self.experts = nn.ModuleList(_AdapterExpert() for _ in range(4))

    def forward(self, x):
        t = x.reshape(-1, 16)
        weights, chosen = self.gate(t).softmax(-1).topk(2, dim=-1)
        out = torch.zeros_like(t)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            out.index_add_(0, token, expert.lora_forward(t[token], t[token]) * weights[token, slot, None])
        return out.view_as(x)


def test_experts_run_by_a_method_of_another_name_are_refused_naming_the_method_call():
    """The experts' Linears are called as modules (their hooks run); what the rule misses is the expert's own call:
    the error says that, not that hooks are skipped."""
    with pytest.raises(AutocalError) as caught:
        autocal.synthesize(_MethodCalledExpertsMoE())
    assert "through a method" in caught.value.explanation and "hooks" not in caught.value.explanation


class _GroupedListsMoE(nn.Module):
    """Experts kept in a list of per-rank lists (expert-parallel code run in one process): ``ranks[r][j]``."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(16, 4, bias=False)
        self.ranks = nn.ModuleList(nn.ModuleList(SwiGLU() for _ in range(2)) for _ in range(2))

    def forward(self, x):
        t = x.reshape(-1, 16)
        weights, chosen = self.gate(t).softmax(-1).topk(2, dim=-1)
        out = torch.zeros_like(t)
        for r, experts in enumerate(self.ranks):
            for j, expert in enumerate(experts):
                token, slot = torch.where(chosen == 2 * r + j)
                out.index_add_(0, token, expert(t[token]) * weights[token, slot, None])
        return out.view_as(x)


def test_experts_in_a_list_of_lists_are_refused_saying_so():
    """Before, the error said the experts were run through a method instead of being called, and pointed at the
    expert's own forward: the experts are called, one level further down than the list the rule reads."""
    with pytest.raises(AutocalError) as caught:
        autocal.convert(nn.Sequential(_GroupedListsMoE()))
    assert "list of lists of experts" in str(caught.value) and "through a method" not in str(caught.value)
    assert "flattened" in caught.value.hints[0]


class ChosenByInputMoE(nn.Module):
    """Two expert sets, each token's set chosen by an input (``token_type_ids``), then a top-k in the set."""

    def __init__(self, per_set: int = 3) -> None:
        super().__init__()
        self.text_router = nn.Linear(16, per_set, bias=False)
        self.image_router = nn.Linear(16, per_set, bias=False)
        self.experts = nn.ModuleList(SwiGLU() for _ in range(2 * per_set))
        self.per_set = per_set

    def forward(self, x, token_type_ids):
        flat, kinds = x.reshape(-1, x.shape[-1]), token_type_ids.reshape(-1)
        out = torch.zeros_like(flat)
        for kind, router in enumerate((self.text_router, self.image_router)):
            weights, chosen = F.softmax(router(flat), -1).topk(1, dim=-1)
            for e in range(self.per_set):
                rows = ((chosen[:, 0] == e) & (kinds == kind)).nonzero()[:, 0]
                out[rows] += weights[rows] * self.experts[kind * self.per_set + e](flat[rows])
        return out.view_as(x)


def test_experts_chosen_by_an_input_as_well_are_refused_not_silently_half_calibrated():
    """Forcing the top-k cannot send a token of the other kind to an expert: the rule names the experts left short
    of tokens (a specialised rule may take such a block first; here called directly)."""
    torch.manual_seed(0)
    block = ChosenByInputMoE().eval()
    x = _inputs(2, 4)
    kinds = torch.tensor([[0, 1, 0, 1], [1, 1, 0, 0]])
    call = BlockCall((x,), {"token_type_ids": kinds})
    with pytest.raises(AutocalError) as caught:
        detect_last_resort(Facts(block, call))
    assert "all 8 tokens" in str(caught.value)


@pytest.mark.parametrize("name", ["modulelist_loop", "masked_loop"])
def test_a_specialised_rule_and_the_last_resort_agree(name):
    """Where a specialised rule matches (it comes first: the faster path), the last resort matches the block too,
    and both calibration modules give the original's output with every token seen by every expert."""
    pattern = PATTERNS[name]
    block = pattern.make()
    assert decide(block).rule.name == pattern.rule != "last-resort"
    plan = detect_last_resort(Facts(block))
    assert isinstance(plan, LastResortPlan)
    module = build_last_resort(plan, block)(block)
    for shape in ((1, 1), (2, 5)):
        _check(block, module, pattern.example()[0][: shape[0], : shape[1]])
