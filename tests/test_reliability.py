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

import copy

import pytest
from hypothesis import given
from hypothesis import strategies as st
import torch
import torch.nn.functional as F
from torch import nn

import autocal
from autocal.testing import zoo
from autocal.testing.assertions import count_rows
from autocal.testing.corpus import equivalent
from autocal.testing.patterns import (
    BanksBelowRouterMoE, CapacityExpert, CapacityMoE, ChainHolder, DeclaringModel, ExpertChoiceMoE, GatheredMoE,
    GroupedGemmMoE, HeadBank, HeadsThenMoE, HostSlicedMoE, ItemAssignmentMoE, LayoutThenMoE, LogitsToBanksMoE,
    LoopOverOwnWeights,
    MaskedDictMoE, MaskedEncoder, MixtureOfHeadsAttention, NeuronExperts, OwnWeightsMoE, PerSampleModel, PerSampleMoE,
    SoftMixture, SortedChoiceMoE, ThresholdChoiceMoE, TokenByTokenMoE, TwoPositionTables, UnroutedSlice, WeightlessChoicesMoE
)
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
    with pytest.raises(autocal.AutocalError) as error:
        autocal.convert(nn.Sequential(UnroutedSlice()))
    assert error.value.kind in autocal.errors.KINDS
    assert error.value.block_class == "UnroutedSlice" and error.value.module_path == "0"
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


def test_experts_already_run_on_every_token_are_recognised_not_skipped():
    """Gated experts (each on the whole input, output masked per sample): converted as such, nothing re-run."""
    model = PerSampleModel()
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
    assert type(model.block) is PerSampleMoE


def test_a_list_of_identical_layers_called_in_sequence_is_not_an_moe():
    holder = ChainHolder()
    assert autocal.explain(holder).blocks == []
    with pytest.raises(autocal.AutocalError) as raised:
        autocal.convert(holder)
    assert raised.value.kind == autocal.errors.NO_MOE_BLOCK


def test_a_block_the_model_declares_as_routing_is_never_skipped_silently():
    model = DeclaringModel()
    entry = autocal.explain(model).blocks[0]
    assert entry.block_class == "TableRoutingMoE" and entry.failure["kind"] == autocal.errors.UNSUPPORTED_DISPATCH
    assert "produces router logits" in entry.failure["explanation"]
    with pytest.raises(autocal.AutocalError) as raised:
        autocal.convert(model)
    assert raised.value.kind == autocal.errors.UNSUPPORTED_DISPATCH and raised.value.module_path == "mlp"
    shown = autocal.explain(model, example_inputs={"hidden_states": torch.randn(2, 3, 8)}).blocks[0]
    assert shown.failure and (shown.top_k, shown.num_experts) == (2, 4), "what the recording shows of the router"


def test_router_choices_without_weights_run_as_the_original_runs_them():
    torch.manual_seed(0)
    block = WeightlessChoicesMoE()
    x = torch.randn(40, 8)
    expected, module = _original_and_synthesized(block, x)
    assert module.structure.experts.num_experts == 4 and module.structure.router.num_choices == 7
    assert module.structure.experts.layout["choices_without_weights"] == 3
    for calibrate in (False, True):
        module.calibrate_all_experts = calibrate
        with torch.no_grad():
            out = module(x)
        assert torch.equal(out, expected) if not calibrate else compare_outputs(expected, out)[2]


def _masked_loop():
    """Rows picked with a boolean mask, a data-dependent ``if``: the toy kind ``masked_loop``."""
    return make_toy_block(ToyMoEConfig(kind="masked_loop", hidden_size=16, num_experts=6, top_k=2))


@pytest.mark.parametrize("block_cls", [_masked_loop, ItemAssignmentMoE, MaskedDictMoE])
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


def test_experts_weights_further_down_than_their_router_are_reported_not_skipped():
    model = nn.Sequential(BanksBelowRouterMoE())
    entry = autocal.explain(model).blocks[0]
    assert entry.block_class == "BanksBelowRouterMoE" and entry.paths == ["0"]
    assert entry.failure["kind"] == autocal.errors.UNSUPPORTED_DISPATCH and "stores weights per expert" in str(
        entry.failure)
    with pytest.raises(autocal.AutocalError):
        autocal.convert(model)


def test_sorted_dispatch_through_weight_banks():
    torch.manual_seed(0)
    block = GroupedGemmMoE()
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


def test_experts_routing_through_weight_banks_below_the_router_are_one_block():
    """The experts module holding the banks is the block (the sorted-banks rule reads it, its router's logits an
    input); the layer holding the router beside it is not a second block over the same banks."""
    torch.manual_seed(0)
    model = nn.Sequential(LogitsToBanksMoE())
    x = torch.randn(2, 7, 8)
    autocal.convert(model, example_inputs={"input": x})
    converted = [n for n, m in model.named_modules() if isinstance(m, autocal.MoECalibrationModule)]
    assert converted == ["0.experts"] and model[0].experts.structure.level == "sorted"
    torch.manual_seed(0)
    original = nn.Sequential(LogitsToBanksMoE())
    for shape in ((1, 1, 8), (2, 5, 8), (1, 9, 8)):
        equivalent(original, model, (torch.randn(shape),), {})


def test_a_soft_mixture_already_calibrates_every_expert():
    torch.manual_seed(0)
    model = nn.Sequential(SoftMixture())
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


def test_attention_experts_are_calibrated_by_forcing_the_routing():
    torch.manual_seed(0)
    attention = MixtureOfHeadsAttention(experts=5, k=2)
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
    assert type(attention.heads.query) is HeadBank, "the original block keeps its own banks"


def test_forcing_the_routing_needs_example_inputs_to_find_the_user_of_the_experts():
    model = nn.Sequential(MixtureOfHeadsAttention())
    with pytest.raises(autocal.AutocalError, match="never called|example inputs"):
        autocal.convert(model)


@pytest.mark.parametrize("make, shape", [
    (lambda: GatheredMoE(), (2, 5, 16)),
    (lambda: OwnWeightsMoE(), (9, 8)),
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
    assert len(linears) == 3 * num_experts if isinstance(block, GatheredMoE) else 2 * num_experts
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


def test_experts_that_are_rows_of_embedding_tables():
    torch.manual_seed(0)
    block = NeuronExperts()
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


@pytest.mark.parametrize("with_example", [False, True])
def test_two_tables_of_one_shape_that_no_router_picks_from_are_not_an_moe(with_example):
    model = LayoutThenMoE()
    coordinates = torch.randint(0, 16, (1, 5, 2))
    autocal.convert(model, example_inputs={"coordinates": coordinates} if with_example else None)
    assert isinstance(model.moe, autocal.MoECalibrationModule)
    assert type(model.layout) is TwoPositionTables


@pytest.mark.parametrize("k, capacity_factor", [(1, 1.0), (2, 1.25), (2, 8.0)])
def test_dispatch_by_a_mask_contraction_with_capacity(k, capacity_factor):
    torch.manual_seed(0)
    block = CapacityMoE(k=k, capacity_factor=capacity_factor)
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
        _, bitwise, close = compare_outputs(expected, out)
        assert bitwise if not calibrate else close, "the block's own forward gives the output"
        if not calibrate:
            assert set(rows.values()) == {max(1, int(capacity_factor * k * 18 / 4))}, "the capacity rows only"
        else:  # the slots the mask fills, then every token it left out (dropped ones included); no empty slot
            assert len(seen) == 4
            for e, inputs in seen.items():
                got = torch.cat(inputs)
                assert got.shape[0] == 18, f"expert {e} saw every token once"
                assert all((row == got).all(-1).any() for row in x.reshape(-1, 16))


@given(experts=st.integers(2, 6), k=st.integers(1, 3), tokens=st.integers(1, 17),
       capacity_factor=st.sampled_from([0.5, 1.0, 2.0]), seed=st.integers(0, 2**16))
def test_mask_dispatch_calibrates_every_expert_on_every_token(experts, k, tokens, capacity_factor, seed):
    k = min(k, experts)
    torch.manual_seed(seed)
    block = CapacityMoE(experts=experts, k=k, capacity_factor=capacity_factor)
    x = torch.randn(1, tokens, 16)
    with torch.no_grad():
        expected = block(x)
    module = autocal.synthesize(block, verify=False)
    capacity_rows = max(1, int(capacity_factor * k * tokens / experts))
    for calibrate in (False, True):
        module.calibrate_all_experts = calibrate
        with torch.no_grad(), count_rows({e: m.fc2 for e, m in enumerate(module.experts)}) as rows:
            _, bitwise, close = compare_outputs(expected, module(x))
        assert bitwise if not calibrate else close
        if calibrate:  # the slots each mask fills, then the tokens it left out: every token once, no empty slot
            assert set(rows.values()) == {tokens}
        else:
            assert set(rows.values()) == {capacity_rows}


class _PairExpert(CapacityExpert):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return super().forward(x), x.abs().mean()


class _PairExpertsCapacityMoE(CapacityMoE):
    """Top-1 with a capacity of every token, experts returning ``(rows, a statistic)``: their outputs are not rows
    detection can put back in place of the slots."""

    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.ModuleList(_PairExpert() for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        gates = self.wg(flat).softmax(-1)
        mask = torch.nn.functional.one_hot(gates.argmax(-1), len(self.experts))
        slot = torch.nn.functional.one_hot(((torch.cumsum(mask, 0) - 1) * mask).sum(-1), flat.shape[0])
        combine = (gates * mask)[:, :, None] * slot[:, None, :]
        dispatched = torch.einsum("sec,sm->ecm", (combine > 0).to(flat.dtype), flat)
        outputs = torch.stack([expert(rows)[0] for expert, rows in zip(self.experts, dispatched)])
        return torch.einsum("sec,ecm->sm", combine, outputs).view_as(x)


def test_mask_dispatch_whose_slots_are_not_mapped_keeps_every_slot():
    """Where detection cannot map the mask's slots to an expert's input and output rows, nothing is left out of
    its calls: its Linears see all its slots, then every token the mask left out."""
    torch.manual_seed(0)
    block = _PairExpertsCapacityMoE()
    x = torch.randn(1, 11, 16)
    expected, module = _original_and_synthesized(block, x)
    assert module.structure.level == "mask-dispatch" and module.plan.dispatch.out_features is None
    for calibrate in (False, True):
        module.calibrate_all_experts = calibrate
        with torch.no_grad(), count_rows({e: m.fc1 for e, m in enumerate(module.experts)}) as rows:
            assert torch.equal(module(x), expected)
        if calibrate:  # 11 slots each, then the 3 * 11 tokens routed elsewhere
            assert min(rows.values()) >= 11 and sum(rows.values()) == 4 * 11 + 3 * 11
        else:
            assert set(rows.values()) == {11}


@pytest.mark.parametrize("tokens", [5, 14, 40])
def test_recipes_recorded_at_another_number_of_tokens_still_cover_every_token(tokens):
    """Detection runs on made-up inputs; the capacity it records is not the one of the calibration batch."""
    torch.manual_seed(0)
    block = ExpertChoiceMoE()
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


@pytest.mark.parametrize("style", ["linear", "transposed", "matmul"])
def test_expert_weights_sliced_per_expert_in_a_loop(style):
    torch.manual_seed(0)
    block = LoopOverOwnWeights(style)
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


def test_identical_layers_whose_inputs_cannot_be_made_up_are_not_an_moe():
    model = HeadsThenMoE()
    autocal.convert(model)  # no example inputs: the heads' forward cannot be run alone, and nothing routes them
    assert isinstance(model.moe, autocal.MoECalibrationModule) and type(model.encoder) is MaskedEncoder


@pytest.mark.parametrize("tokens", [3, 14, 40])
def test_rows_sorted_by_expert_and_sliced_on_the_host(tokens):
    torch.manual_seed(0)
    block = HostSlicedMoE()
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


def test_experts_called_one_token_at_a_time():
    torch.manual_seed(0)
    block = TokenByTokenMoE()
    x = torch.randn(1, 9, 16)
    expected, module = _original_and_synthesized(block, x)
    assert module.structure.level == "recorded-block" and module.structure.router.top_k == 2
    with torch.no_grad(), count_rows({e: m.up_proj for e, m in enumerate(module.experts)}) as rows:
        assert torch.equal(module(x), expected)
    assert set(rows.values()) == {9}


def test_a_sort_then_the_first_k_is_a_top_k():
    torch.manual_seed(0)
    block = SortedChoiceMoE()
    x = torch.randn(1, 9, 16)
    expected, module = _original_and_synthesized(block, x)
    assert module.structure.router.top_k == 2 and module.structure.router.selection == "sort"
    with torch.no_grad(), count_rows({e: m.up_proj for e, m in enumerate(module.experts.values())}) as rows:
        assert torch.equal(module(x), expected)
    assert set(rows.values()) == {9}


@pytest.mark.parametrize("k", [1, 2, 3])
def test_a_kthvalue_threshold_is_a_top_k(k):
    """Scores kept where they reach their own (E - k + 1)-th smallest value choose k experts per token: explain
    says so (it said k = the number of tokens, of 0 experts), and every expert sees every token."""
    torch.manual_seed(0)
    block = ThresholdChoiceMoE(k=k)
    x = torch.randn(1, 9, 16)
    expected, module = _original_and_synthesized(block, x)
    shown = autocal.explain(block).blocks[0]
    assert (shown.top_k, shown.num_experts, shown.scoring) == (k, 6, "softmax")
    assert (module.structure.router.top_k, module.structure.router.selection) == (k, "kthvalue")
    with torch.no_grad(), count_rows({e: m.up_proj for e, m in enumerate(module.experts)}) as rows:
        assert torch.equal(module(x), expected)
    assert set(rows.values()) == {9}


@pytest.mark.parametrize("counts", [[3, 0, 4, 2], [0, 0, 9, 0], [2, 2, 2, 1]])
def test_a_grouped_matmul_decomposes_into_what_it_computes(counts):
    """``trace/decompose.py`` runs ``F.grouped_mm`` as rows ``offsets[e-1]:offsets[e]`` times ``w[e]``: the same
    product within rounding (rows past the last offset, which the fused op leaves unset, are zeros)."""
    from autocal.trace.decompose import decomposition

    torch.manual_seed(0)
    rows, weight = torch.randn(9, 16), torch.randn(4, 16, 8)
    offsets = torch.cumsum(torch.tensor(counts), dim=0, dtype=torch.int32)
    fused = torch.nn.functional.grouped_mm(rows, weight, offs=offsets)
    decomposed = decomposition(torch.nn.functional.grouped_mm, (rows, weight), {"offs": offsets})()
    end = int(offsets[-1])
    assert compare_outputs(fused[:end], decomposed[:end])[2] and not decomposed[end:].any()
    assert decomposition(torch.matmul, (rows, weight[0]), {}) is None


class _ChosenExpertsOnEveryToken(nn.Module):
    """Packed weights on the block, each *chosen* expert (``ids.unique()``) run on every token and weighted by
    ``(w * (ids == e)).sum(-1)``: dense on a batch where every expert is chosen, not on one token."""

    def __init__(self, hidden: int = 16, width: int = 12, experts: int = 6, k: int = 2) -> None:
        super().__init__()
        self.k, self.gate = k, nn.Linear(hidden, experts, bias=False)
        self.w13 = nn.Parameter(torch.randn(experts, 2 * width, hidden) / hidden ** 0.5)
        self.w2 = nn.Parameter(torch.randn(experts, hidden, width) / width ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.reshape(-1, x.shape[-1])
        w, ids = torch.topk(self.gate(t).softmax(dim=-1), self.k, dim=-1)
        out = torch.zeros_like(t)
        for e in ids.unique().tolist():
            gate, up = (t @ self.w13[e].t()).chunk(2, dim=-1)
            out = out + (F.silu(gate) * up) @ self.w2[e].t() * (w * (ids == e)).sum(dim=-1, keepdim=True)
        return out.view_as(x)


@pytest.mark.parametrize("tokens", [1, 3, 9])
def test_experts_run_on_every_token_only_when_chosen_are_not_taken_for_dense(tokens):
    """Every expert on every token in the example's forward is no proof of a dense block: one token runs only its k
    experts. The block is calibrated by forcing its choice, and every expert Linear sees every token."""
    torch.manual_seed(0)
    block = _ChosenExpertsOnEveryToken().eval()
    module = autocal.synthesize(copy.deepcopy(block))
    equivalent(block, module, (torch.randn(1, tokens, 16),), {})
