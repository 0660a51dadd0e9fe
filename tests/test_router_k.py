"""``explain`` reports the k a block really routes each token to, also for selections made one after another."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import autocal
from autocal.testing.corpus import ENTRIES


def _experts_per_token(block, x) -> float:
    """The rows all experts receive, per token: k, measured on the block's own forward."""
    rows = []
    handles = [e.register_forward_pre_hook(lambda _, args: rows.append(args[0].shape[0])) for e in block.experts]
    try:
        with torch.no_grad():
            block(x)
    finally:
        for handle in handles:
            handle.remove()
    return sum(rows) / (x.numel() // x.shape[-1])


def test_argmax_then_masked_argmax_is_k_2():
    entry = ENTRIES["sparsemixer"]
    block = entry.build(0)
    (x,), _ = entry.inputs(2, 7)
    report = autocal.explain(block, verify=False)
    assert report.blocks[0].top_k == _experts_per_token(block, x)


class _GShardTop2(torch.nn.Module):
    """GShard's top-2 gate: the argmax, then the argmax of the probabilities with the first choice masked out
    (multiplied by ``1 - one_hot``, or filled with -inf); each token's two experts run in a loop over the experts."""

    def __init__(self, masking: str, hidden: int = 16, experts: int = 5) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.masking = masking
        self.wg = torch.nn.Linear(hidden, experts, bias=False)
        self.experts = torch.nn.ModuleList(torch.nn.Sequential(
            torch.nn.Linear(hidden, 24), torch.nn.GELU(), torch.nn.Linear(24, hidden)) for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.reshape(-1, x.shape[-1])
        probs = self.wg(t).softmax(-1)
        first = probs.argmax(-1)
        mask = F.one_hot(first, len(self.experts))
        masked = probs * (1 - mask) if self.masking == "multiply" else probs.masked_fill(mask.bool(), float("-inf"))
        second = masked.argmax(-1)
        chosen = torch.stack([first, second], dim=-1)
        weights = probs.gather(-1, chosen)
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(t)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            out.index_add_(0, token, expert(t[token]) * weights[token, slot, None])
        return out.view_as(x)


@pytest.mark.parametrize("masking", ["multiply", "masked_fill"])
def test_gshard_top2_is_k_2(masking):
    block = _GShardTop2(masking).eval()
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(0))
    report = autocal.explain(block, verify=False)
    assert report.blocks[0].failure is None
    assert report.blocks[0].top_k == _experts_per_token(block, x) == 2


def test_capacity_top2_with_einsum_gating_is_k_2_scored_by_softmax():
    """GShard with a capacity (the corpus block): max, then the max of the probabilities times ``1 - one_hot``,
    dispatch and combine tensors; the gate is an einsum with the block's own ``[H, E]`` weight, not a Linear."""
    report = autocal.explain(ENTRIES["gshard_top2"].build(0), verify=False).blocks[0]
    assert report.failure is None
    assert (report.top_k, report.scoring) == (2, "softmax")


def test_the_router_is_the_module_scoring_tokens_not_the_experts_choosing_among_them():
    """An experts layer given the router logits picks the top-k itself: the gate computing the logits is the router
    (kept out of quantization), not the experts module, and it is no shared expert."""
    structure = autocal.synthesize(ENTRIES["engine_fused_layer"].build(0)).structure
    assert structure.router.module_path == "gate"
    assert structure.experts.module_path == "experts" and "gate" not in structure.shared_modules


def _mlp_experts(experts: int, hidden: int) -> torch.nn.ModuleList:
    return torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(hidden, 12), torch.nn.GELU(),
                                                   torch.nn.Linear(12, hidden)) for _ in range(experts))


class _EveryTokenExpertChoice(torch.nn.Module):
    """Expert choice with a capacity of every token (``topk(T)`` over the tokens, per expert), plain MLP experts."""

    def __init__(self, experts=6, hidden=16):
        super().__init__()
        self.k = experts
        self.gate = torch.nn.Linear(hidden, experts, bias=False)
        self.experts = _mlp_experts(experts, hidden)

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        weights, tokens = self.gate(flat).softmax(-1).t().topk(flat.shape[0], dim=-1)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            out.index_add_(0, tokens[e], expert(flat[tokens[e]]) * weights[e, :, None])
        return out.view_as(x)


@pytest.mark.parametrize("capacity", ["a third", "every token"])
def test_experts_choosing_their_tokens_report_the_experts_a_token_gets_on_average(capacity):
    """Expert choice (a top-k over the tokens, per expert): not 'k = capacity of T tokens' but k the experts a
    token gets on average, of the block's experts, and the selection said in words. With every token taken by
    every expert the block rule reads the block, its indices one expert's row at a time (``tokens[e]``)."""
    from autocal.testing.patterns import PATTERNS

    torch.manual_seed(0)
    block = PATTERNS["expert_choice"].make() if capacity == "a third" else _EveryTokenExpertChoice()
    report = autocal.explain(block, verify=False)
    (found,) = report.blocks
    assert (found.top_k, found.num_experts) == (block.k, len(block.experts))
    assert "expert choice" in found.structure["router"]["selection"]


def _experts_of_each_token(block, x) -> torch.Tensor:
    """How many experts each token of ``x`` reaches in the block's own forward: the rows each expert gets, matched
    to the tokens they are (the inputs are distinct random rows)."""
    rows = x.reshape(-1, x.shape[-1])
    tokens = []

    def seen(_, args):
        tokens.append((args[0][:, None] == rows[None]).all(-1).nonzero()[:, 1])

    hooks = [e.register_forward_pre_hook(seen) for e in block.experts]
    try:
        with torch.no_grad():
            block(x)
    finally:
        for hook in hooks:
            hook.remove()
    return torch.bincount(torch.cat(tokens), minlength=rows.shape[0])


@pytest.mark.parametrize("spelling", ["kept", "removed"])
@pytest.mark.parametrize("p", [0.3, 0.6, 0.9, torch.tensor(0.6)])
def test_top_p_reports_the_range_of_k_and_p(spelling, p):
    """Top-p routing keeps each token's best experts until they reach p: not one k but a range, which the report
    gives as the fewest and most experts the recorded tokens reach, with p in words (it said k = 1); p may be a
    number or a 0-d tensor."""
    from autocal.testing.patterns import TopPChoiceMoE

    torch.manual_seed(0)
    block = TopPChoiceMoE(p=p, spelling=spelling).eval()
    x = torch.randn(1, 40, 16, generator=torch.Generator().manual_seed(1))
    reached = _experts_of_each_token(block, x)
    assert reached.min() >= 1 and reached.max() > reached.min()  # k varies
    router = autocal.synthesize(block, example_inputs={"x": x}).structure.router
    assert router.dynamic_k == (int(reached.min()), int(reached.max()))
    assert router.top_k == int(reached.max()) and f"p={float(p):g}" in router.selection
    assert "top-p" in router.selection and "(dynamic" in str(autocal.explain(block, verify=False))


class _TopAny(torch.nn.Module):
    """Top-any gating: each expert kept where its sigmoid score passes a learned threshold of its own; where none
    passes, the argmax expert alone (k varies by token, from 1 to every expert)."""

    def __init__(self, hidden: int = 16, experts: int = 6) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(hidden, experts, bias=False)
        self.threshold = torch.nn.Parameter(torch.randn(experts) * 0.3)
        self.experts = torch.nn.ModuleList(torch.nn.Linear(hidden, hidden) for _ in range(experts))

    def forward(self, x):
        t = x.reshape(-1, x.shape[-1])
        scores = torch.sigmoid(self.proj(t))
        chosen = scores > torch.sigmoid(self.threshold)
        best = F.one_hot(scores.argmax(-1), scores.shape[-1]).bool()
        chosen = torch.where(chosen.any(-1, keepdim=True), chosen, best)
        weights = scores * chosen / (scores * chosen).sum(-1, keepdim=True)
        out = torch.zeros_like(t)
        for e, expert in enumerate(self.experts):
            rows = chosen[:, e].nonzero().squeeze(-1)
            out[rows] += weights[rows, e, None] * expert(t[rows])
        return out.view_as(x)


def test_experts_kept_above_thresholds_report_the_range_of_k():
    """Experts chosen by comparing each score with a threshold, an argmax only where none passes: the report gives
    the fewest and most experts the recorded tokens reach (it said k = 1, the argmax's)."""
    torch.manual_seed(0)
    block = _TopAny().eval()
    x = torch.randn(1, 40, 16, generator=torch.Generator().manual_seed(1))
    reached = _experts_of_each_token(block, x)
    assert reached.min() >= 1 and reached.max() > reached.min()  # k varies
    router = autocal.synthesize(block, example_inputs={"x": x}).structure.router
    assert router.dynamic_k == (int(reached.min()), int(reached.max())) and router.top_k == int(reached.max())
    assert "(dynamic" in str(autocal.explain(block, verify=False))


class _HashLookup(torch.nn.Module):
    """Hash routing: each token's expert is its id modulo the number of experts (no top-k), a sigmoid weight."""

    def __init__(self):
        super().__init__()
        self.gate = torch.nn.Linear(16, 4, bias=False)
        self.experts = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.GELU(),
                                                               torch.nn.Linear(12, 16)) for _ in range(4))

    def forward(self, x, input_ids):
        t = x.reshape(-1, 16)
        chosen = (input_ids.reshape(-1) % 4)[:, None]
        weight = torch.sigmoid(self.gate(t)).gather(1, chosen)
        out = torch.zeros_like(t)
        for e, expert in enumerate(self.experts):
            rows = (chosen[:, 0] == e).nonzero().squeeze(-1)
            out[rows] = weight[rows] * expert(t[rows])
        return out.view_as(x)


def test_experts_looked_up_by_token_id_report_k_1():
    """No top-k to read k from: the report said k = the rows the first expert got (4 of 40 tokens here)."""
    torch.manual_seed(0)
    block = _HashLookup().eval()
    x = torch.randn(1, 40, 16, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, 50, (1, 40), generator=torch.Generator().manual_seed(2))
    report = autocal.explain(block, verify=False, example_inputs={"x": x, "input_ids": ids})
    assert report.blocks[0].top_k == _experts_per_token_of(block, x, ids) == 1


def _experts_per_token_of(block, x, ids) -> float:
    rows = []
    handles = [e.register_forward_pre_hook(lambda _, args: rows.append(args[0].shape[0])) for e in block.experts]
    with torch.no_grad():
        block(x, ids)
    for handle in handles:
        handle.remove()
    return sum(rows) / x.shape[1]


class _ReluGates(torch.nn.Module):
    """ReMoE-style routing: ReLU of the router's logits gates the experts, no top-k; an expert runs on the rows whose
    gate for it is positive (``(gates[:, e] > 0).nonzero()``), so a token reaches any number of experts, none
    included."""

    def __init__(self, hidden: int = 16, experts: int = 6) -> None:
        super().__init__()
        self.router = torch.nn.Linear(hidden, experts, bias=False)
        self.experts = torch.nn.ModuleList(torch.nn.Linear(hidden, hidden) for _ in range(experts))

    def forward(self, x):
        t = x.reshape(-1, x.shape[-1])
        gates = F.relu(self.router(t))
        out = torch.zeros_like(t)
        for e, expert in enumerate(self.experts):
            rows = torch.nonzero(gates[:, e] > 0).squeeze(-1)
            out.index_add_(0, rows, gates[rows, e, None] * expert(t[rows]))
        return out.view_as(x)


@torch.jit.script
def _scripted_top2(logits: torch.Tensor):
    weights, indices = torch.softmax(logits, dim=-1).topk(2, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), indices


class _ScriptedGate(_ReluGates):
    """The top-2 made inside a TorchScript function, where the recording does not see it."""

    def forward(self, x):
        t = x.reshape(-1, x.shape[-1])
        weights, indices = _scripted_top2(self.router(t))
        out = torch.zeros_like(t)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(indices == e)
            out.index_add_(0, token, weights[token, slot, None] * expert(t[token]))
        return out.view_as(x)


@pytest.mark.parametrize("block_class", [_ReluGates, _ScriptedGate])
def test_rows_chosen_without_a_selection_report_the_recorded_k(block_class):
    """Where no top-k, argmax or sort is seen behind an expert's rows, k is what the recorded tokens reached: for
    ReLU gates a range (from none), for a top-2 inside a TorchScript function 2. The report gave the length of the
    last expert's row list as k (10 and 5 of 0 experts)."""
    torch.manual_seed(0)
    block = block_class().eval()
    x = torch.randn(1, 40, 16, generator=torch.Generator().manual_seed(1))
    reached = _experts_of_each_token(block, x)
    router = autocal.synthesize(block, example_inputs={"x": x}).structure.router
    assert router.top_k == int(reached.max())
    if block_class is _ScriptedGate:
        assert router.dynamic_k is None and router.top_k == 2 and bool((reached == 2).all())
    else:
        assert reached.max() > reached.min() and router.dynamic_k == (int(reached.min()), int(reached.max()))


def _sort_routed_split():
    """The corpus' sorted-split block with its top-k written as a descending sort cut to k, its dispatch an
    ``argsort`` of the chosen experts' ids as before."""
    from autocal.testing.corpus import SortedSplitMoE

    class SortRoutedSplitMoE(SortedSplitMoE):
        def forward(self, x):
            t = x.reshape(-1, x.shape[-1])
            values, order = self.router(t).softmax(dim=-1).sort(dim=-1, descending=True)
            weights, indices = values[:, :2] / values[:, :2].sum(-1, keepdim=True), order[:, :2]
            flat = indices.reshape(-1)
            rows = torch.argsort(flat, stable=True)
            counts = torch.bincount(flat, minlength=self.num_experts)
            out = self.experts(t[rows // 2], counts) * weights.reshape(-1)[rows].unsqueeze(-1)
            return torch.zeros_like(t).index_add_(0, rows // 2, out).reshape(x.shape)

    return SortRoutedSplitMoE()


def test_sorting_the_chosen_experts_for_dispatch_is_no_routing_choice():
    """A top-k spelled as a sort, then rows grouped by an ``argsort`` of the chosen ids: k is the sort's cut (2),
    not the dispatch's (1 of T·k)."""
    from autocal.testing.corpus import init_normal

    report = autocal.explain(init_normal(_sort_routed_split(), 0), verify=False)
    (found,) = report.blocks
    assert (found.top_k, found.num_experts) == (2, 6)


class _GroupMaxMoE(torch.nn.Module):
    """Experts in groups, each token given the best expert of every group (``scores.view(T, G, -1).max(-1)``, a
    mixture of grouped experts): k is the number of groups, of all the experts."""

    def __init__(self, hidden=16, experts=6, groups=2):
        super().__init__()
        self.groups = groups
        self.gate = torch.nn.Linear(hidden, experts, bias=False)
        self.experts = _mlp_experts(experts, hidden)

    def forward(self, x):
        t = x.reshape(-1, x.shape[-1])
        weights, best = self.gate(t).softmax(-1).view(t.shape[0], self.groups, -1).max(dim=-1)
        chosen = best + torch.arange(0, len(self.experts), len(self.experts) // self.groups)
        out = torch.zeros_like(t)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            out.index_add_(0, token, expert(t[token]) * weights[token, slot, None])
        return out.view_as(x)


def test_one_expert_chosen_in_each_group_is_a_fixed_k_of_all_the_experts():
    torch.manual_seed(0)
    report = autocal.explain(_GroupMaxMoE(), verify=False)
    (found,) = report.blocks
    assert (found.top_k, found.num_experts) == (2, 6)
    assert found.structure["router"]["num_choices"] == 6 and found.structure["router"]["dynamic_k"] is None


def _sort_routed_loop():
    """The corpus' packed-loop block (each expert's weights ``w[e]`` in a loop) with its top-k spelled as a
    descending sort cut to k: the gathered rule forces the sort, its forced experts first."""
    from autocal.testing.corpus import PackedLoopMoE

    class SortRoutedLoopMoE(PackedLoopMoE):
        def forward(self, x):
            t = x.reshape(-1, x.shape[-1])
            values, order = self.router(t).softmax(dim=-1).sort(dim=-1, descending=True)
            weights, indices = values[:, :self.top_k], order[:, :self.top_k]
            out = torch.zeros_like(t)
            for e in range(self.num_experts):
                token, slot = torch.where(indices == e)
                gate, up = F.linear(t[token], self.gate_up[e]).chunk(2, dim=-1)
                out.index_add_(0, token, F.linear(F.silu(gate) * up, self.down[e]) * weights[token, slot, None])
            return out.reshape(x.shape)

    return SortRoutedLoopMoE()


def test_a_top_k_spelled_as_a_descending_sort_cut_to_k_is_forced():
    from autocal.testing.corpus import CorpusEntry, check_convert, check_synthesize

    entry = CorpusEntry("sort_routed_loop", "a sort cut to k", (), _sort_routed_loop)
    check_synthesize(entry)
    check_convert(entry)
    report = autocal.explain(autocal.testing.corpus.init_normal(_sort_routed_loop(), 0), verify=False)
    assert (report.blocks[0].top_k, report.blocks[0].num_experts) == (2, 6)
