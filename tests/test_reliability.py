"""The catalogue of bad and odd inputs (issue 7), each with its expected behaviour.

Covered elsewhere, and part of the catalogue:
- a model with no MoE block: tests/test_api.py::test_model_without_moe_gives_a_clear_error
- one token, k == number of experts, experts that receive no tokens, bfloat16: the
  @example cases of tests/test_equivalence.py (and its drawn configs)
- converting twice: tests/test_api.py::test_convert_twice_is_idempotent
- an exception inside calibration_context: tests/test_api.py::test_calibration_context_restores_on_error
- an override that breaks the contract: tests/test_api.py::test_override_breaking_the_contract_is_rejected_at_registration
- checksums after restore(): tests/test_models.py, and every zoo row (tests/test_zoo.py)
- permanent unpacking reproduces the packed tensors: tests/test_api.py::test_permanent_unpacking_reproduces_the_packed_tensors
- parameters on the meta device: every zoo row converts its meta-device twin
"""

import pytest
from hypothesis import given
from hypothesis import strategies as st
import torch
from torch import nn

import autocal
from autocal.testing import zoo
from autocal.testing.assertions import count_rows
from autocal.testing.patterns import CapacityExpert as _CapacityExpert, CapacityMoE as _CapacityMoE
from autocal.testing.patterns import SoftMixture as _SoftMixture, SwiGLU as _SwiGLU
from autocal.testing.toy_moe import ToyMoEConfig, example_hidden_states, main_output, make_toy_block
from autocal.verify import compare_outputs


def _original_and_synthesized(block, x):
    """The block's own output on ``x``, and its synthesized calibration module."""
    with torch.no_grad():
        expected = block(x)
    return expected, autocal.synthesize(block)


def _outputs(module, x, calibrate):
    module.calibrate_all_experts = calibrate
    with torch.no_grad():
        return module(x)


def test_block_that_cannot_be_traced_raises_with_kind_class_and_source():
    class Unrouted(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = nn.Module()
            self.experts.gate_up_proj = nn.Parameter(torch.randn(4, 8, 4))
            self.experts.down_proj = nn.Parameter(torch.randn(4, 4, 4))
            self.router = nn.Linear(4, 4)

        def forward(self, hidden_states):
            return hidden_states @ self.experts.gate_up_proj[0].T[:4]

    with pytest.raises(autocal.AutocalError) as error:
        autocal.convert(nn.Sequential(Unrouted()))
    assert error.value.kind in autocal.errors.KINDS
    assert error.value.block_class == "Unrouted" and error.value.module_path == "0"
    assert "docs/errors/" in str(error.value)


@pytest.mark.parametrize("kind", ["concat", "modulelist_loop", "scores_on_inputs"])
def test_router_producing_nan_gives_the_original_nans(kind):
    config = ToyMoEConfig(kind=kind)
    block = make_toy_block(config)
    x = example_hidden_states(config, seq=6)
    x[0, 2] = float("nan")  # one token's router scores become NaN
    with torch.no_grad():
        expected = block(x)
    module = autocal.synthesize(block, verify=False)
    _, bitwise, _ = compare_outputs(expected, _outputs(module, x, False))
    assert bitwise or torch.equal(main_output(expected).isnan(), main_output(_outputs(module, x, False)).isnan())
    assert torch.equal(main_output(expected).isnan(), main_output(_outputs(module, x, True)).isnan())


@pytest.mark.parametrize("kind", ["concat", "interleaved", "modulelist_loop", "scores_on_inputs", "no_gate"])
def test_zero_tokens(kind):
    config = ToyMoEConfig(kind=kind)
    block = make_toy_block(config)
    x = example_hidden_states(config, seq=1)[:, :0]
    expected, module = _original_and_synthesized(block, x)
    for calibrate in (False, True):
        out = _outputs(module, x, calibrate)
        assert main_output(out).shape == main_output(expected).shape == (1, 0, config.hidden_size)


def test_float16_weights():
    config = ToyMoEConfig(kind="concat", dtype=torch.float16)
    block = make_toy_block(config)
    x = example_hidden_states(config, seq=7)
    expected, module = _original_and_synthesized(block, x)
    assert torch.equal(_outputs(module, x, False), expected)
    assert compare_outputs(expected, _outputs(module, x, True))[2]


def test_parameters_on_the_meta_device_convert_without_memory():
    model = zoo.build_model("qwen3_moe", device="meta")
    autocal.convert(model)
    assert all(p.is_meta for p in model.parameters())
    assert isinstance(model.model.layers[0].mlp, autocal.MoECalibrationModule)
    assert model.model.layers[0].mlp.experts[3].down_proj.weight.is_meta


def test_accelerate_offloaded_model_gives_a_clear_error():
    accelerate = pytest.importorskip("accelerate")
    model = zoo.build_model("qwen3_moe")
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    with pytest.raises(autocal.AutocalError) as error:
        autocal.convert(model)
    assert error.value.kind == autocal.errors.HOOKED_MODULE
    assert "before dispatching" in str(error.value)


def test_one_block_reached_by_two_paths_stays_shared():
    config = ToyMoEConfig()
    block = make_toy_block(config)
    model = nn.Sequential(block, block)  # the same block object twice (tied)
    x = example_hidden_states(config)
    with torch.no_grad():
        expected = model(x)
    autocal.convert(model)
    assert isinstance(model[0], autocal.MoECalibrationModule) and isinstance(model[1], autocal.MoECalibrationModule)
    assert model[0] is model[1]
    for module in (model[0], model[1]):
        module.calibrate_all_experts = False
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_coverage_flags_experts_that_saw_no_token():
    config = ToyMoEConfig(num_experts=8, top_k=1)
    model = nn.Sequential(make_toy_block(config))
    autocal.convert(model, calibrate_all_experts=False)
    report = autocal.coverage(model)
    report.reset(model)
    with torch.no_grad():
        model(example_hidden_states(config, seq=1))
    report = autocal.coverage(model)
    assert sum(report.tokens["0"]) == 1 and len(report.unseen()["0"]) == 7
    assert "experts with no token" in str(report)
    model[0].calibrate_all_experts = True
    report.reset(model)
    with torch.no_grad():
        model(example_hidden_states(config, seq=3))
    assert autocal.coverage(model).tokens["0"] == [3] * 8 and not autocal.coverage(model).unseen()


class _MLP(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(hidden, 2 * hidden), nn.Linear(2 * hidden, hidden)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class _PerSampleExperts(nn.ModuleList):
    """Each expert on every token, its output zeroed for the samples that did not pick it."""

    def forward(self, hidden, choice):
        out = torch.zeros_like(hidden)
        for i, expert in enumerate(self):
            out = out + expert(hidden) * (choice.view(-1, 1, 1) == i)
        return out


class _PerSampleBlock(nn.Module):
    def __init__(self, hidden=8, experts=3):
        super().__init__()
        self.shared = nn.Linear(hidden, hidden)
        self.experts = _PerSampleExperts(_MLP(hidden) for _ in range(experts))

    def forward(self, hidden, choice):
        return self.shared(hidden) + self.experts(hidden, choice)


class _PerSampleModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = _PerSampleBlock()

    def forward(self, hidden, choice):
        return self.block(hidden, choice)


def test_experts_already_run_on_every_token_are_recognised_not_skipped():
    """Gated experts (each on the whole input, output masked per sample): converted as such, nothing re-run."""
    model = _PerSampleModel()
    inputs = {"hidden": torch.randn(2, 5, 8), "choice": torch.tensor([2, 0])}
    with torch.no_grad():
        expected = model(**inputs)
    report = autocal.explain(model, example_inputs=inputs)
    block = report.blocks[0]
    assert (block.level, block.num_experts, block.top_k, block.scoring) == ("gated", 3, 1, "mask")
    autocal.convert(model, example_inputs=inputs)
    assert isinstance(model.block, autocal.MoECalibrationModule)
    autocal.coverage(model).reset(model)
    with torch.no_grad():
        assert torch.equal(model(**inputs), expected)
    assert autocal.coverage(model).tokens["block"] == [10, 10, 10], "every expert saw every token once"
    autocal.restore(model)
    assert type(model.block) is _PerSampleBlock


class _Chained(nn.ModuleList):
    def forward(self, x):
        for layer in self:
            x = layer(x)
        return x


def test_a_list_of_identical_layers_called_in_sequence_is_not_an_moe():
    holder = _ChainHolder()
    assert autocal.explain(holder).blocks == []
    with pytest.raises(autocal.AutocalError) as raised:
        autocal.convert(holder)
    assert raised.value.kind == autocal.errors.NO_MOE_BLOCK


class _ChainHolder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = _Chained(nn.Linear(4, 4) for _ in range(3))

    def forward(self, hidden_states):
        return self.layers(hidden_states)


class _UnknownRouting(nn.Module):
    """An MoE autocal cannot read (experts are rows of a table), declared by its model as giving router logits."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(8, 4)
        self.table = nn.Embedding(16, 8)

    def forward(self, hidden_states):
        logits = self.router(hidden_states)
        return hidden_states + self.table(logits.topk(2).indices).sum(-2), logits


class _DeclaringModel(nn.Module):
    _can_record_outputs = {"router_logits": _UnknownRouting}

    def __init__(self):
        super().__init__()
        self.mlp = _UnknownRouting()

    def forward(self, hidden_states):
        return self.mlp(hidden_states)[0]


def test_a_block_the_model_declares_as_routing_is_never_skipped_silently():
    model = _DeclaringModel()
    entry = autocal.explain(model).blocks[0]
    assert entry.block_class == "_UnknownRouting" and entry.failure["kind"] == autocal.errors.UNSUPPORTED_DISPATCH
    assert "produces router logits" in entry.failure["explanation"]
    with pytest.raises(autocal.AutocalError) as raised:
        autocal.convert(model)
    assert raised.value.kind == autocal.errors.UNSUPPORTED_DISPATCH and raised.value.module_path == "mlp"
    shown = autocal.explain(model, example_inputs={"hidden_states": torch.randn(2, 3, 8)}).blocks[0]
    assert shown.failure and (shown.top_k, shown.num_experts) == (2, 4), "what the recording shows of the router"


class _ExpertsWithWeightlessChoices(nn.Module):
    """Packed experts plus choices that have no weights: ``E`` MLPs, then ``Z`` choices that scale the input."""

    def __init__(self, experts=4, weightless=3, hidden=8, width=6):
        super().__init__()
        self.experts, self.weightless = experts, weightless
        self.w_in = nn.Parameter(torch.randn(experts + weightless, width, hidden) / 3)  # extra entries unused
        self.w_out = nn.Parameter(torch.randn(experts, hidden, width) / 3)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for expert in range(self.experts + self.weightless):
            slot, token = torch.where(top_k_index.transpose(0, 1) == expert)
            if token.numel() == 0:
                continue
            rows = hidden_states[token]
            if expert < self.experts:
                rows = torch.nn.functional.linear(torch.tanh(torch.nn.functional.linear(rows, self.w_in[expert])),
                                                  self.w_out[expert])
            else:
                rows = 0.5 * rows
            out.index_add_(0, token, rows * top_k_weights[token, slot, None])
        return out


class _WeightlessChoicesBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(8, 7, bias=False)
        self.experts = _ExpertsWithWeightlessChoices()

    def forward(self, hidden_states):
        weights, index = self.gate(hidden_states).softmax(-1).topk(3, dim=-1)
        return self.experts(hidden_states, index, weights)


def test_router_choices_without_weights_run_as_the_original_runs_them():
    torch.manual_seed(0)
    block = _WeightlessChoicesBlock()
    x = torch.randn(40, 8)
    expected, module = _original_and_synthesized(block, x)
    assert module.structure.experts.num_experts == 4 and module.structure.router.num_choices == 7
    assert module.structure.experts.layout["choices_without_weights"] == 3
    for calibrate in (False, True):
        module.calibrate_all_experts = calibrate
        with torch.no_grad():
            out = module(x)
        assert torch.equal(out, expected) if not calibrate else compare_outputs(expected, out)[2]


class _ItemAssignment(nn.Module):
    """``y[token] += expert(x[token]) * w``, and a shared expert: item assignment fx cannot trace."""

    def __init__(self, experts=5, k=2):
        super().__init__()
        self.top_k, self.router = k, nn.Linear(16, experts)
        self.experts = nn.ModuleList(_SwiGLU() for _ in range(experts))
        self.shared = _SwiGLU()

    def forward(self, x):
        weights, index = self.router(x).softmax(-1).topk(self.top_k)
        flat, index, weights = x.reshape(-1, 16), index.reshape(-1, self.top_k), weights.reshape(-1, self.top_k)
        y = torch.zeros_like(flat)
        for e in range(len(self.experts)):
            token, slot = (index == e).nonzero(as_tuple=True)
            y[token] += self.experts[e](flat[token]) * weights[token, slot, None]
        return y.view_as(x) + self.shared(x)


class _DictOfExperts(nn.Module):
    """Top-1 over a ``ModuleDict`` keyed by name; rows picked from ``[batch, seq, hidden]`` with a 2-D mask."""

    def __init__(self, experts=4):
        super().__init__()
        self.top_k, self.classifier = 1, nn.Linear(16, experts)
        self.experts = nn.ModuleDict({f"expert_{i}": _SwiGLU() for i in range(experts)})

    def forward(self, x):
        weight, index = self.classifier(x).softmax(-1).max(-1)
        out = torch.zeros_like(x)
        for i in range(len(self.experts)):
            chosen = index == i
            out[chosen] = self.experts[f"expert_{i}"](x[chosen]) * weight[chosen].unsqueeze(-1)
        return out


def _masked_loop():
    """Rows picked with a boolean mask, a data-dependent ``if``: the toy kind ``masked_loop``."""
    return make_toy_block(ToyMoEConfig(kind="masked_loop", hidden_size=16, num_experts=6, top_k=2))


@pytest.mark.parametrize("block_cls", [_masked_loop, _ItemAssignment, _DictOfExperts])
def test_dispatch_loops_fx_cannot_trace_are_recorded(block_cls):
    torch.manual_seed(0)
    block = block_cls()
    x = torch.randn(3, 5, 16)
    expected, module = _original_and_synthesized(block, x)
    assert module.structure.level == "recorded-block" and module.structure.experts.num_experts == len(block.experts)
    assert module.structure.router.top_k == block.top_k
    experts = dict(enumerate(module.expert_modules()))
    for calibrate in (False, True):
        module.calibrate_all_experts = calibrate
        with torch.no_grad(), count_rows(experts) as rows:
            assert torch.equal(module(x), expected)  # the block's own forward computes the output
        assert sum(rows.values()) == 15 * block.top_k if not calibrate else all(n == 15 for n in rows.values()), rows
    assert autocal.restore(nn.Sequential(module))[0] is block


class _WeightBank(nn.Module):
    def __init__(self, experts, n_in, n_out, scaled=False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(experts, n_in, n_out) / n_in ** 0.5)
        self.scale = nn.Parameter(torch.ones(())) if scaled else None

    def forward(self, x, counts):  # rows sorted by expert, ``counts`` rows each
        out = torch.cat([part @ w for part, w in zip(x.split(counts), self.weight)])
        return out if self.scale is None else out * self.scale


class _SortedExperts(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = _WeightBank(4, 8, 12, scaled=True), _WeightBank(4, 12, 8, scaled=True)

    def forward(self, x, counts):
        return self.fc2(torch.relu(self.fc1(x, counts)), counts)


class _SortedDispatch(nn.Module):
    """Experts one level down in two scaled weight banks (not recognised); the router two levels above."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(8, 4, bias=False)
        self.experts = _SortedExperts()

    def forward(self, x):
        expert = self.router(x).argmax(-1)
        order = expert.argsort()
        counts = torch.bincount(expert, minlength=4).tolist()
        out = torch.empty_like(x)
        out[order] = self.experts(x[order], counts)
        return out


def test_experts_weights_further_down_than_their_router_are_reported_not_skipped():
    model = nn.Sequential(_SortedDispatch())
    entry = autocal.explain(model).blocks[0]
    assert entry.block_class == "_SortedDispatch" and entry.paths == ["0"]
    assert entry.failure["kind"] == autocal.errors.UNSUPPORTED_DISPATCH and "stores weights per expert" in str(
        entry.failure)
    with pytest.raises(autocal.AutocalError):
        autocal.convert(model)


class _GroupedGemmBlock(nn.Module):
    """Megablocks-style: rows sorted by expert, weight banks called with the row count of each expert."""

    def __init__(self, experts=5, k=2):
        super().__init__()
        self.k, self.router = k, nn.Linear(8, experts, bias=False)
        self.up, self.down = _WeightBank(experts, 8, 12), _WeightBank(experts, 12, 8)

    def forward(self, x):
        flat = x.reshape(-1, 8)
        weights, index = self.router(flat).softmax(-1).topk(self.k)
        order = index.flatten().argsort(stable=True)
        counts = torch.bincount(index.flatten(), minlength=self.router.out_features).tolist()
        rows = flat[order // self.k]
        out = self.down(torch.nn.functional.gelu(self.up(rows, counts)), counts)
        out = out * weights.flatten()[order, None]
        return torch.zeros_like(flat).index_add(0, order // self.k, out).view_as(x)


def test_sorted_dispatch_through_weight_banks():
    torch.manual_seed(0)
    block = _GroupedGemmBlock()
    x = torch.randn(2, 9, 8)
    expected, module = _original_and_synthesized(block, x)
    assert module.structure.level == "sorted" and module.structure.router.top_k == 2
    assert module.structure.experts.num_experts == 5 and module.structure.router.scoring == "softmax"
    for calibrate in (False, True):
        module.calibrate_all_experts = calibrate
        with torch.no_grad():
            assert torch.equal(module(x), expected), "unobserved: the banks themselves run"
    ups = {e: linear for e, linear in enumerate(module.up.experts())}
    downs = {e: linear for e, linear in enumerate(module.down.experts())}
    for calibrate in (False, True):
        module.calibrate_all_experts = calibrate
        with torch.no_grad(), count_rows(ups) as up_rows, count_rows(downs) as down_rows:
            out = module(x)
        assert compare_outputs(expected, out)[2]
        if calibrate:
            assert set(up_rows.values()) == set(down_rows.values()) == {18}, "every expert saw every token once"
        else:
            assert sum(up_rows.values()) == sum(down_rows.values()) == 18 * 2
    assert autocal.restore(nn.Sequential(module))[0] is block


def test_a_soft_mixture_already_calibrates_every_expert():
    torch.manual_seed(0)
    model = nn.Sequential(_SoftMixture())
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        expected = model(x)
    report = autocal.explain(model)
    block = report.blocks[0]
    assert (block.level, block.num_experts, block.top_k, block.scoring) == ("gated", 3, 3, "weights")
    autocal.convert(model)
    autocal.coverage(model).reset(model)
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    assert autocal.coverage(model).tokens["0"] == [10, 10, 10]


class _HeadBank(nn.Module):
    """One projection per expert, ``[E, out, in]``, taking rows sorted by expert and a tensor of counts."""

    def __init__(self, experts, features_in, features_out):
        super().__init__()
        self.w = nn.Parameter(torch.randn(experts, features_out, features_in) / features_in ** 0.5)

    def forward(self, rows, counts):
        return torch.cat([torch.nn.functional.linear(part, w) for part, w in zip(rows.split(counts.tolist()), self.w)])


class _HeadExperts(nn.Module):
    """Mixture of attention heads: a query and an output projection per expert, used through two methods."""

    def __init__(self, experts=6, k=2, hidden=8, head=4):
        super().__init__()
        self.k, self.head = k, head
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.query, self.out = _HeadBank(experts, hidden, head), _HeadBank(experts, head, hidden)

    def forward(self, x):
        raise NotImplementedError("called through project() and combine()")

    def project(self, x):  # [T, hidden] -> queries [T, k, head]
        scores, chosen = torch.topk(self.gate(x).sigmoid(), self.k, dim=-1)
        order = chosen.flatten().argsort(stable=True)
        counts = torch.bincount(chosen.flatten(), minlength=self.gate.out_features)
        queries = torch.zeros(x.shape[0] * self.k, self.head).index_copy(
            0, order, self.query(x[order // self.k], counts))
        return queries.view(x.shape[0], self.k, self.head), (order, counts, scores / scores.sum(-1, keepdim=True))

    def combine(self, attended, topology):  # [T, k, head] -> [T, hidden]
        order, counts, weights = topology
        rows = self.out(attended.reshape(-1, self.head)[order], counts)
        slots = torch.zeros(attended.shape[0] * self.k, rows.shape[-1]).index_copy(0, order, rows)
        return (slots.view(attended.shape[0], self.k, -1) * weights[..., None]).sum(1)


class _MixtureOfHeadsAttention(nn.Module):
    """Causal attention whose queries and output projections are routed experts; keys and values are shared."""

    def __init__(self, **sizes):
        super().__init__()
        self.heads = _HeadExperts(**sizes)
        self.kv = nn.Linear(8, 2 * self.heads.head, bias=False)

    def attend(self, queries, keys, values):  # queries [T, k, head]; every slot attends over all earlier tokens
        scores = torch.einsum("tkd,sd->kts", queries, keys) / keys.shape[-1] ** 0.5
        causal = torch.ones(keys.shape[0], keys.shape[0], dtype=torch.bool).tril()
        return torch.einsum("kts,sd->tkd", scores.masked_fill(~causal, float("-inf")).softmax(-1), values)

    def forward(self, x):
        queries, topology = self.heads.project(x)
        keys, values = self.kv(x).chunk(2, dim=-1)
        return self.heads.combine(self.attend(queries, keys, values), topology)

    def what_expert_sees(self, x, expert):
        """The output projection input of ``expert`` for every token, had the router chosen it (written out)."""
        keys, values = self.kv(x).chunk(2, dim=-1)
        queries = torch.nn.functional.linear(x, self.heads.query.w[expert])
        return self.attend(queries[:, None], keys, values)[:, 0]


def test_attention_experts_are_calibrated_by_forcing_the_routing():
    torch.manual_seed(0)
    attention = _MixtureOfHeadsAttention(experts=5, k=2)
    model = nn.Sequential(attention)
    x = torch.randn(7, 8)
    with torch.no_grad():
        expected = model(x)
    autocal.convert(model, example_inputs={"input": x})  # the experts' forward is never called: their user is
    module = model[0]
    assert isinstance(module, autocal.MoECalibrationModule) and module.structure.level == "sorted"
    assert module.structure.experts.num_experts == 5 and module.structure.router.top_k == 2
    assert "forced" in module.structure.experts.layout["unrouted tokens"]
    kv_calls = []
    attention.kv.register_forward_hook(lambda *_: kv_calls.append(1))
    queries = dict(enumerate(module.heads.query.experts()))
    outs = dict(enumerate(module.heads.out.experts()))
    seen = {}
    for e, linear in outs.items():
        linear.register_forward_pre_hook(lambda m, a, e=e: seen.setdefault(e, []).append(a[0].detach().clone()))
    for calibrate in (False, True):
        module.calibrate_all_experts = calibrate
        kv_calls.clear(), seen.clear()
        with torch.no_grad(), count_rows(queries) as query_rows, count_rows(outs) as out_rows:
            out = module(x)
        assert torch.equal(out, expected), "the output is the original forward's"
        assert len(kv_calls) == 1, "modules other than the experts see the real forward only"
        if not calibrate:
            assert sum(query_rows.values()) == sum(out_rows.values()) == 7 * 2
            continue
        assert set(query_rows.values()) == set(out_rows.values()) == {7}, "every expert saw every token once"
        for e in range(5):
            with torch.no_grad():
                reference = attention.what_expert_sees(x, e)
            got = torch.cat(seen[e])
            assert got.shape == reference.shape
            assert all(torch.isclose(row, got, atol=1e-6).all(-1).any() for row in reference), \
                f"expert {e} saw what it would have seen, had it been chosen"
    assert autocal.restore(model)[0] is attention
    assert type(attention.heads.query) is _HeadBank, "the original block keeps its own banks"


def test_forcing_the_routing_needs_example_inputs_to_find_the_user_of_the_experts():
    model = nn.Sequential(_MixtureOfHeadsAttention())
    with pytest.raises(autocal.AutocalError, match="never called|example inputs"):
        autocal.convert(model)


class _GatheredFFN(nn.Module):
    """gpt-fast's pattern: per token, the chosen experts' weights are gathered and contracted in one einsum."""

    def __init__(self, experts, hidden, width):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(experts, width, hidden) / hidden ** 0.5)
        self.w3 = nn.Parameter(torch.randn(experts, width, hidden) / hidden ** 0.5)
        self.w2 = nn.Parameter(torch.randn(experts, hidden, width) / width ** 0.5)

    def forward(self, x, expert_indices):  # -> one output per slot, [T, k, hidden]
        x1 = torch.nn.functional.silu(torch.einsum("ti,taoi->tao", x, self.w1[expert_indices]))
        x3 = torch.einsum("ti,taoi->tao", x, self.w3[expert_indices])
        return torch.einsum("tao,taio->tai", x1 * x3, self.w2[expert_indices])


class _GatheredMoE(nn.Module):
    def __init__(self, experts=6, hidden=16, width=24, k=2):
        super().__init__()
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.cond_ffn = _GatheredFFN(experts, hidden, width)
        self.hidden, self.k = hidden, k

    def forward(self, x):
        flat = x.view(-1, self.hidden)
        weights, indices = torch.topk(self.gate(flat).softmax(-1), self.k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        return torch.einsum("tai,ta->ti", self.cond_ffn(flat, indices), weights).view_as(x)


class _OwnWeightsMoE(nn.Module):
    """Expert weights on the block itself, ``[E, in, out]``, gathered with index_select and applied by matmul."""

    def __init__(self, experts=5, hidden=8, width=12, k=3):
        super().__init__()
        self.router = nn.Parameter(torch.randn(experts, hidden))
        self.up = nn.Parameter(torch.randn(experts, hidden, width) / hidden ** 0.5)
        self.down = nn.Parameter(torch.randn(experts, width, hidden) / width ** 0.5)
        self.k = k

    def forward(self, hidden_states):
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        scores, chosen = (x @ self.router.T).sigmoid().topk(self.k)
        flat = chosen.reshape(-1)
        h = torch.relu(torch.matmul(x.repeat_interleave(self.k, 0)[:, None], self.up.index_select(0, flat)))
        out = torch.matmul(h, self.down.index_select(0, flat)).view(x.shape[0], self.k, -1)
        return (out * scores[..., None]).sum(1).view_as(hidden_states)


@pytest.mark.parametrize("make, shape", [
    (lambda: _GatheredMoE(), (2, 5, 16)),
    (lambda: _OwnWeightsMoE(), (9, 8)),
], ids=["gpt-fast", "on-the-block"])
def test_expert_weights_gathered_by_the_routing_indices(make, shape):
    torch.manual_seed(0)
    block = make()
    x = torch.randn(shape)
    with torch.no_grad():
        expected = block(x)
    tokens = x.numel() // x.shape[-1]
    model = nn.Sequential(block)
    autocal.convert(model)
    module = model[0]
    assert module.structure.level == "gathered" and module.structure.router.top_k == block.k
    num_experts = module.structure.experts.num_experts
    linears = {(name, e): linear for name, m in module.named_modules() if name.endswith("_experts")
               for e, linear in enumerate(m.experts())}
    assert len(linears) == 3 * num_experts if isinstance(block, _GatheredMoE) else 2 * num_experts
    assert len({id(p) for p in module.parameters()}) == len(list(module.parameters())), "nothing listed twice"
    for calibrate in (False, True):
        module.calibrate_all_experts = calibrate
        with torch.no_grad():
            assert torch.equal(module(x), expected), "plain and unobserved: the original ops"
        with torch.no_grad(), count_rows(linears) as rows:
            out = module(x)
        assert compare_outputs(expected, out)[2]
        if calibrate:
            assert set(rows.values()) == {tokens}, "every expert saw every token once"
        else:
            assert sum(rows.values()) == tokens * block.k * len(linears) // num_experts
    with torch.no_grad():
        for linear in linears.values():
            linear.weight.mul_(0.5)  # what a quantizer does in place: the original's forward sees it too
        assert not torch.equal(module(x), expected)
    assert autocal.restore(model)[0] is block


class _NeuronExperts(nn.Module):
    """Experts of one neuron each, rows of two embedding tables, chosen over a product of two key sets."""

    def __init__(self, keys=3, hidden=8, k=2):
        super().__init__()
        self.k = k
        self.keys = nn.Linear(hidden, 2 * keys, bias=False)
        self.down, self.up = nn.Embedding(keys * keys, hidden), nn.Embedding(keys * keys, hidden)

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        rows, columns = self.keys(flat).chunk(2, dim=-1)
        scores, chosen = (rows[:, :, None] + columns[:, None, :]).flatten(1).topk(self.k)
        h = torch.einsum("th,tkh->tk", flat, self.down(chosen)).relu() * scores.softmax(-1)
        return torch.einsum("tk,tkh->th", h, self.up(chosen)).view_as(x)


def test_experts_that_are_rows_of_embedding_tables():
    torch.manual_seed(0)
    block = _NeuronExperts()
    x = torch.randn(2, 6, 8)
    expected, module = _original_and_synthesized(block, x)
    assert module.structure.level == "gathered" and module.structure.experts.num_experts == 9
    assert module.structure.experts.layout["applied as"] == {"down.weight": "row", "up.weight": "slot-sum"}
    downs = dict(enumerate(module.down.weight_experts.experts()))
    ups = dict(enumerate(module.up.weight_experts.experts()))
    assert downs[0].weight.shape == (1, 8) and ups[0].weight.shape == (8, 1)
    for calibrate in (False, True):
        module.calibrate_all_experts = calibrate
        with torch.no_grad(), count_rows(downs) as down_rows, count_rows(ups) as up_rows:
            out = module(x)
        assert compare_outputs(expected, out)[2]
        if calibrate:
            assert set(down_rows.values()) == set(up_rows.values()) == {12}, "every expert saw every token once"
        else:
            assert sum(down_rows.values()) == sum(up_rows.values()) == 12 * 2


class _TwoPositionTables(nn.Module):
    """Not an MoE: two position tables of one shape (as in layout models), looked up by coordinates."""

    def __init__(self):
        super().__init__()
        self.x_position, self.y_position = nn.Embedding(16, 8), nn.Embedding(16, 8)

    def forward(self, coordinates):
        return self.x_position(coordinates[..., 0]) + self.y_position(coordinates[..., 1])


class _LayoutThenMoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.layout = _TwoPositionTables()
        self.moe = make_toy_block(ToyMoEConfig(hidden_size=8))

    def forward(self, coordinates):
        return self.moe(self.layout(coordinates))


@pytest.mark.parametrize("with_example", [False, True])
def test_two_tables_of_one_shape_that_no_router_picks_from_are_not_an_moe(with_example):
    model = _LayoutThenMoE()
    coordinates = torch.randint(0, 16, (1, 5, 2))
    autocal.convert(model, example_inputs={"coordinates": coordinates} if with_example else None)
    assert isinstance(model.moe, autocal.MoECalibrationModule)
    assert type(model.layout) is _TwoPositionTables


@pytest.mark.parametrize("k, capacity_factor", [(1, 1.0), (2, 1.25), (2, 8.0)])
def test_dispatch_by_a_mask_contraction_with_capacity(k, capacity_factor):
    torch.manual_seed(0)
    block = _CapacityMoE(k=k, capacity_factor=capacity_factor)
    x = torch.randn(2, 9, 16)
    expected, module = _original_and_synthesized(block, x)
    assert module.structure.level == "mask-dispatch" and module.structure.router.top_k == k
    assert module.structure.router.num_choices == 4
    fc1 = {e: expert.fc1 for e, expert in enumerate(module.experts)}
    seen = {}
    for e, linear in fc1.items():
        linear.register_forward_pre_hook(lambda m, a, e=e: seen.setdefault(e, []).append(a[0].detach().clone()))
    for calibrate in (False, True):
        module.calibrate_all_experts = calibrate
        seen.clear()
        with torch.no_grad(), count_rows(fc1) as rows:
            out = module(x)
        assert torch.equal(out, expected), "the block's own forward gives the output"
        if not calibrate:
            assert set(rows.values()) == {max(1, int(capacity_factor * k * 18 / 4))}, "the capacity rows only"
        else:  # capacity rows (some padding) plus every token the mask left out, dropped ones included
            assert len(seen) == 4
            for e, inputs in seen.items():
                got = torch.cat(inputs)
                filled = got[(got != 0).any(-1)]
                assert filled.shape[0] == 18, f"expert {e} saw every token once"
                assert all((row == filled).all(-1).any() for row in x.reshape(-1, 16))


@given(experts=st.integers(2, 6), k=st.integers(1, 3), tokens=st.integers(1, 17),
       capacity_factor=st.sampled_from([0.5, 1.0, 2.0]), seed=st.integers(0, 2**16))
def test_mask_dispatch_calibrates_every_expert_on_every_token(experts, k, tokens, capacity_factor, seed):
    k = min(k, experts)
    torch.manual_seed(seed)
    block = _CapacityMoE(experts=experts, k=k, capacity_factor=capacity_factor)
    x = torch.randn(1, tokens, 16)
    with torch.no_grad():
        expected = block(x)
    module = autocal.synthesize(block, verify=False)
    capacity_rows = max(1, int(capacity_factor * k * tokens / experts))
    for calibrate in (False, True):
        module.calibrate_all_experts = calibrate
        with torch.no_grad(), count_rows({e: m.fc2 for e, m in enumerate(module.experts)}) as rows:
            assert torch.equal(module(x), expected)
        if calibrate:  # capacity rows, then the tokens each mask left out: at least every token
            assert all(n >= tokens for n in rows.values()) and all(n <= tokens + capacity_rows for n in rows.values())


class _ExpertChoiceMoE(nn.Module):
    """Experts choose their tokens (top-C over the tokens per expert, C from the number of tokens)."""

    def __init__(self, hidden=16, experts=6, k=2):
        super().__init__()
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList([_CapacityExpert(hidden) for _ in range(experts)])
        self.k = k

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        capacity = max(1, flat.shape[0] * self.k // len(self.experts))  # a Python number a recording bakes in
        weights, tokens = self.gate(flat).softmax(-1).t().topk(capacity, dim=-1)
        out = torch.zeros_like(flat)
        for expert, module in enumerate(self.experts):
            out.index_add_(0, tokens[expert], module(flat[tokens[expert]]) * weights[expert, :, None])
        return out.view_as(x)


@pytest.mark.parametrize("tokens", [5, 14, 40])
def test_recipes_recorded_at_another_number_of_tokens_still_cover_every_token(tokens):
    """Detection runs on made-up inputs; the capacity it records is not the one of the calibration batch."""
    torch.manual_seed(0)
    block = _ExpertChoiceMoE()
    x = torch.randn(1, tokens, 16)
    expected, module = _original_and_synthesized(block, x)
    assert module.structure.level == "recorded-block"
    seen = {}
    for e, expert in enumerate(module.experts):
        expert.fc1.register_forward_pre_hook(lambda m, a, e=e: seen.setdefault(e, []).append(a[0].detach().clone()))
    with torch.no_grad(), count_rows({e: m.fc1 for e, m in enumerate(module.experts)}) as rows:
        assert torch.equal(module(x), expected)
    assert set(rows.values()) == {tokens}, "every expert saw every token once"
    for e, inputs in seen.items():
        got = torch.cat(inputs)
        assert all((row == got).all(-1).any() for row in x.reshape(-1, 16))


def test_the_rows_an_expert_was_not_given_are_a_multiset_difference():
    from autocal.synthesize.ops import RowComplement

    def rows_not_taken(source, taken):
        return RowComplement(source).rest([taken])

    source = torch.randn(9, 4, dtype=torch.bfloat16)
    source[6] = source[1]  # two equal rows: taking one leaves the other
    left = rows_not_taken(source, source[[1, 3, 8]])
    assert left.shape == (6, 4)
    assert sorted(map(tuple, left.float().tolist())) == sorted(
        map(tuple, source[[0, 2, 4, 5, 6, 7]].float().tolist()))
    assert rows_not_taken(source, source[:0]).shape == (9, 4) and rows_not_taken(source, source).shape == (0, 4)


class _LoopOverOwnWeights(nn.Module):
    """Expert weights on the block itself, sliced per expert in a Python loop (three ways of applying them)."""

    def __init__(self, style, experts=6, hidden=16, width=24, k=2):
        super().__init__()
        self.style, self.k = style, k
        self.gate = nn.Linear(hidden, experts, bias=False)
        up_shape = (experts, hidden, width) if style == "matmul" else (experts, width, hidden)
        down_shape = (experts, width, hidden) if style == "matmul" else (experts, hidden, width)
        self.up = nn.Parameter(torch.randn(up_shape) / hidden ** 0.5)
        self.down = nn.Parameter(torch.randn(down_shape) / width ** 0.5)

    def _project(self, rows, weight):
        if self.style == "linear":
            return torch.nn.functional.linear(rows, weight)
        return rows @ weight.T if self.style == "transposed" else rows @ weight

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        weights, chosen = self.gate(flat).softmax(-1).topk(self.k)
        out = torch.zeros_like(flat)
        for expert in chosen.unique():  # a 0-d tensor per expert hit
            token, slot = torch.where(chosen == expert)
            h = self._project(torch.nn.functional.silu(self._project(flat[token], self.up[expert])), self.down[expert])
            out.index_add_(0, token, h * weights[token, slot, None])
        return out.view_as(x)


@pytest.mark.parametrize("style", ["linear", "transposed", "matmul"])
def test_expert_weights_sliced_per_expert_in_a_loop(style):
    torch.manual_seed(0)
    block = _LoopOverOwnWeights(style)
    x = torch.randn(2, 7, 16)
    expected, module = _original_and_synthesized(block, x)
    assert module.structure.level == "gathered" and module.structure.router.top_k == 2
    orientation = "matmul" if style == "matmul" else "linear"
    assert module.structure.experts.layout["applied as"] == {"up": orientation, "down": orientation}
    linears = {(name, e): linear for name in ("up_experts", "down_experts")
               for e, linear in enumerate(module.get_submodule(name).experts())}
    assert linears[("up_experts", 0)].weight.shape == (24, 16)
    for calibrate in (False, True):
        module.calibrate_all_experts = calibrate
        with torch.no_grad():
            assert torch.equal(module(x), expected), "plain and unobserved: the original ops"
        with torch.no_grad(), count_rows(linears) as rows:
            assert compare_outputs(expected, module(x))[2]
        assert set(rows.values()) == {14} if calibrate else sum(rows.values()) == 14 * 2 * 2


class _SummedHeads(nn.ModuleList):
    """A list of identical projections with a forward of its own."""

    def forward(self, x):
        return sum(layer(x) for layer in self)


class _Encoder(nn.Module):
    """Not an MoE: the heads' user needs a mask autocal cannot make up."""

    def __init__(self):
        super().__init__()
        self.heads = _SummedHeads([nn.Linear(8, 8) for _ in range(3)])

    def forward(self, x, keep):
        return self.heads(x) * keep[..., None]


class _HeadsThenMoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = _Encoder()
        self.moe = make_toy_block(ToyMoEConfig(hidden_size=8))

    def forward(self, x):
        return self.moe(self.encoder(x, torch.ones(x.shape[:-1])))


def test_identical_layers_whose_inputs_cannot_be_made_up_are_not_an_moe():
    model = _HeadsThenMoE()
    autocal.convert(model)  # no example inputs: the heads' forward cannot be run alone, and nothing routes them
    assert isinstance(model.moe, autocal.MoECalibrationModule) and type(model.encoder) is _Encoder


class _RemoteCodeExpert(nn.Module):
    def __init__(self, hidden=16, width=24):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(hidden, width, bias=False), nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class _RemoteCodeMoE(nn.Module):
    """The pattern of DeepSeek-V2/V3's remote code (``moe_infer``): rows sorted by expert, counts taken to numpy
    on the host, each expert given its slice of the sorted rows."""

    def __init__(self, hidden=16, experts=8, k=2):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(experts, hidden) / 4)
        self.experts = nn.ModuleList([_RemoteCodeExpert(hidden) for _ in range(experts)])
        self.k = k

    def forward(self, hidden_states):
        x = hidden_states.view(-1, hidden_states.shape[-1])
        scores = torch.nn.functional.linear(x.float(), self.weight.float()).sigmoid()
        topk_idx = torch.topk(scores, k=self.k, dim=-1, sorted=False)[1]
        topk_weight = scores.gather(1, topk_idx)
        topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        counts = topk_idx.new_zeros((topk_idx.shape[0], len(self.experts))).scatter_(1, topk_idx, 1).sum(0)
        idxs = topk_idx.view(-1).argsort()
        sorted_tokens = x[idxs // topk_idx.shape[1]]
        outputs, start = [], 0
        for i, num_tokens in enumerate(counts.cpu().numpy()):
            end = start + num_tokens
            if num_tokens == 0:
                continue
            outputs.append(self.experts[i](sorted_tokens[start:end]))
            start = end
        outs = torch.cat(outputs, dim=0)
        new_x = torch.empty_like(outs)
        new_x[idxs] = outs
        y = new_x.view(*topk_idx.shape, -1).type(topk_weight.dtype).mul_(topk_weight.unsqueeze(-1)).sum(1)
        return y.type(new_x.dtype).view_as(hidden_states)


@pytest.mark.parametrize("tokens", [3, 14, 40])
def test_rows_sorted_by_expert_and_sliced_on_the_host(tokens):
    torch.manual_seed(0)
    block = _RemoteCodeMoE()
    x = torch.randn(1, tokens, 16)
    expected, module = _original_and_synthesized(block, x)
    assert module.structure.level == "recorded-block"
    assert module.structure.router.top_k == 2 and module.structure.router.scoring == "sigmoid"
    downs = {e: m.down_proj for e, m in enumerate(module.experts)}
    for calibrate in (False, True):
        module.calibrate_all_experts = calibrate
        with torch.no_grad(), count_rows(downs) as rows:
            assert torch.equal(module(x), expected)
        assert set(rows.values()) == {tokens} if calibrate else sum(rows.values()) == tokens * 2


class _TokenByTokenMoE(nn.Module):
    """A naive reference: every token's every slot, one expert call at a time, expert numbers read on the host."""

    def __init__(self, hidden=16, experts=5, k=2):
        super().__init__()
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList([_RemoteCodeExpert(hidden) for _ in range(experts)])
        self.k = k

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        weights, chosen = torch.topk(self.gate(flat).softmax(-1), self.k)
        out = torch.zeros_like(flat)
        for token in range(flat.shape[0]):
            for slot in range(self.k):
                out[token] += weights[token, slot] * self.experts[int(chosen[token, slot])](flat[token:token + 1])[0]
        return out.view_as(x)


def test_experts_called_one_token_at_a_time():
    torch.manual_seed(0)
    block = _TokenByTokenMoE()
    x = torch.randn(1, 9, 16)
    expected, module = _original_and_synthesized(block, x)
    assert module.structure.level == "recorded-block" and module.structure.router.top_k == 2
    with torch.no_grad(), count_rows({e: m.up_proj for e, m in enumerate(module.experts)}) as rows:
        assert torch.equal(module(x), expected)
    assert set(rows.values()) == {9}


class _SortedChoiceMoE(nn.Module):
    """Experts in a ModuleDict; the choice is a full sort of the scores, then the first k."""

    def __init__(self, hidden=16, experts=5, k=2):
        super().__init__()
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleDict({f"e{i}": _RemoteCodeExpert(hidden) for i in range(experts)})
        self.k = k

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        scores, order = self.gate(flat).softmax(-1).sort(dim=-1, descending=True)
        weights, chosen = scores[:, :self.k], order[:, :self.k]
        out = torch.zeros_like(flat)
        for e in range(len(self.experts)):
            mask = chosen == e
            rows = mask.any(-1)
            if rows.any():
                out[rows] += self.experts[f"e{e}"](flat[rows]) * (weights * mask).sum(-1, keepdim=True)[rows]
        return out.view_as(x)


def test_a_sort_then_the_first_k_is_a_top_k():
    torch.manual_seed(0)
    block = _SortedChoiceMoE()
    x = torch.randn(1, 9, 16)
    expected, module = _original_and_synthesized(block, x)
    assert module.structure.router.top_k == 2 and module.structure.router.selection == "sort"
    with torch.no_grad(), count_rows({e: m.up_proj for e, m in enumerate(module.experts.values())}) as rows:
        assert torch.equal(module(x), expected)
    assert set(rows.values()) == {9}
