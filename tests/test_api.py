"""Public API behaviour: overrides, calibration_context, restore, errors."""

import copy
import inspect

import pytest
import torch
from torch import nn

import autocal
from autocal.testing.assertions import count_rows, expert_linears
from autocal.testing.corpus import EXPERTS, HIDDEN, TOP_K, SwiGLUExpert, _loop_experts, init_normal
from autocal.testing.toy_moe import KINDS, ToyMoEConfig, example_hidden_states, main_output, make_toy_block
from autocal.verify import compare_outputs


def _checksums(module):
    return {n: p.detach().double().sum().item() for n, p in module.named_parameters()}


def test_registered_override_is_used_instead_of_synthesis():
    calls = []

    @autocal.MoECalibrationModule.register("ToyConcatMoeBlock")
    class HandWritten(autocal.MoECalibrationModule):
        is_permanent = False

        def __init__(self, original, config, calibrate_all_experts=True):
            super().__init__()
            self.inner = original
            self.calibrate_all_experts = calibrate_all_experts

        def forward(self, hidden_states):
            calls.append(self.calibrate_all_experts)
            return self.inner(hidden_states)

    try:
        model = nn.Sequential(make_toy_block(ToyMoEConfig()))
        autocal.convert(model)
        assert isinstance(model[0], HandWritten)
        assert calls, "the override is verified against the original before it is swapped in"
        calls.clear()
        model(example_hidden_states(ToyMoEConfig()))
        assert calls == [True]
        report = autocal.explain(nn.Sequential(make_toy_block(ToyMoEConfig())))
        assert report.blocks[0].how == "registered override"
    finally:
        autocal.MoECalibrationModule.unregister("ToyConcatMoeBlock")


def test_override_that_changes_the_output_is_refused_at_use():
    @autocal.MoECalibrationModule.register("ToyConcatMoeBlock")
    class Wrong(autocal.MoECalibrationModule):
        def __init__(self, original, config, calibrate_all_experts=True):
            super().__init__()
            self.inner = original
            self.calibrate_all_experts = calibrate_all_experts

        def forward(self, hidden_states):
            return self.inner(hidden_states) * 1.5

    try:
        with pytest.raises(autocal.AutocalError) as error:
            autocal.convert(nn.Sequential(make_toy_block(ToyMoEConfig())))
        assert error.value.kind == autocal.errors.VERIFICATION_FAILED
    finally:
        autocal.MoECalibrationModule.unregister("ToyConcatMoeBlock")


def test_restore_puts_an_overrides_original_back():
    @autocal.MoECalibrationModule.register("ToyConcatMoeBlock")
    class Passthrough(autocal.MoECalibrationModule):
        def __init__(self, original, config, calibrate_all_experts=True):
            super().__init__()
            self.inner = original
            self.calibrate_all_experts = calibrate_all_experts

        def forward(self, hidden_states):
            return self.inner(hidden_states)

    try:
        block = make_toy_block(ToyMoEConfig())
        model = nn.Sequential(block)
        with autocal.calibration_context(model):
            assert isinstance(model[0], Passthrough)
        assert model[0] is block
    finally:
        autocal.MoECalibrationModule.unregister("ToyConcatMoeBlock")


def test_override_breaking_the_contract_is_rejected_at_registration():
    with pytest.raises(autocal.AutocalError) as error:
        @autocal.MoECalibrationModule.register("Anything")
        class Broken(autocal.MoECalibrationModule):
            def __init__(self, block):
                super().__init__()
    assert error.value.kind == autocal.errors.BAD_OVERRIDE
    assert "__init__" in str(error.value)


@pytest.mark.parametrize("kind", ["concat", "modulelist_loop"])
def test_calibration_context_restores_on_error(kind):
    config = ToyMoEConfig(kind=kind)
    block = make_toy_block(config)
    model = nn.Sequential(block)
    before = _checksums(model)
    with pytest.raises(RuntimeError, match="boom"):
        with autocal.calibration_context(model) as converted:
            assert isinstance(converted[0], autocal.MoECalibrationModule)
            assert converted[0].calibrate_all_experts
            raise RuntimeError("boom")
    module = model[0]
    if isinstance(module, autocal.MoECalibrationModule):  # permanent: experts stay unpacked
        assert module.is_permanent and not module.calibrate_all_experts
        assert module.restore() is block
    else:  # restored
        assert module is block
    assert _checksums(nn.Sequential(block)) == before


@pytest.mark.parametrize("kind", ["concat", "modulelist_loop"])
def test_calibration_context_turns_calibration_on_for_blocks_converted_before(kind):
    """A model converted with calibration off: inside the context every expert sees every token and the output
    is the original's; after it, the user's conversion stays and calibration is off again."""
    config = ToyMoEConfig(kind=kind)
    model = nn.Sequential(make_toy_block(config))
    original = copy.deepcopy(model)
    hidden = example_hidden_states(config)
    autocal.convert(model, calibrate_all_experts=False)
    converted = model[0]
    tokens = hidden.numel() // hidden.shape[-1]
    with torch.no_grad(), autocal.calibration_context(model):
        assert model[0] is converted and converted.calibrate_all_experts
        with count_rows(expert_linears(model)) as rows:
            out = model(hidden)
        assert set(rows.values()) == {tokens}
    assert compare_outputs(main_output(original(hidden)), main_output(out))[2]
    assert model[0] is converted and not converted.calibrate_all_experts


def test_convert_twice_is_idempotent():
    model = nn.Sequential(make_toy_block(ToyMoEConfig()))
    autocal.convert(model)
    first = model[0]
    autocal.convert(model)
    assert model[0] is first


def test_model_without_moe_gives_a_clear_error():
    with pytest.raises(autocal.AutocalError) as error:
        autocal.convert(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    assert error.value.kind == autocal.errors.NO_MOE_BLOCK
    assert "docs/errors/no-moe-block.md" in str(error.value)
    assert "No MoE block" in str(autocal.explain(nn.Sequential(nn.Linear(4, 4))))


def test_calibration_mode_is_an_attribute_of_each_module():
    a = autocal.synthesize(make_toy_block(ToyMoEConfig()), calibrate_all_experts=True)
    b = autocal.synthesize(make_toy_block(ToyMoEConfig()), calibrate_all_experts=False)
    assert a.calibrate_all_experts and not b.calibrate_all_experts


def test_explain_reports_structure_and_sources():
    report = autocal.explain(make_toy_block(ToyMoEConfig(kind="grouped_sigmoid_bias", num_experts=8, top_k=3,
                                                         n_group=4, topk_group=2)))
    block = report.blocks[0]
    assert (block.num_experts, block.top_k, block.scoring) == (8, 3, "sigmoid")
    assert block.correction_bias == "gate.e_score_correction_bias" and block.grouped
    assert block.structure["experts"]["computation"].startswith("(down_proj(")
    assert "toy_moe.py:" in block.structure["router"]["sources"]["top_k"]
    assert report.successful() and "sigmoid → topk" in str(report)
    assert report.to_json()


class _BroadcastBiasMoE(nn.Module):
    """Sigmoid scores chosen with a correction bias broadcast by ``unsqueeze(0)`` (DeepSeek-V3's remote code), the
    weights taken from the unbiased scores."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.e_score_correction_bias = nn.Parameter(torch.randn(EXPERTS))
        self.experts = nn.ModuleList(SwiGLUExpert() for _ in range(EXPERTS))

    def forward(self, x):
        t = x.reshape(-1, HIDDEN)
        scores = self.gate(t).sigmoid()
        ids = (scores + self.e_score_correction_bias.unsqueeze(0)).topk(TOP_K, dim=-1).indices
        return _loop_experts(t, scores.gather(1, ids), ids, self.experts).view_as(x)


class _ViewedScoresBiasMoE(_BroadcastBiasMoE):
    """The scores viewed before the bias is added (``scores.view(T, -1) + bias.unsqueeze(0)``), the weights gathered
    from the scores themselves (DeepSeek-V3's and GLM-4.5's remote code)."""

    def forward(self, x):
        t = x.reshape(-1, HIDDEN)
        scores = self.gate(t).sigmoid()
        ids = (scores.view(t.shape[0], -1) + self.e_score_correction_bias.unsqueeze(0)).topk(TOP_K, dim=-1).indices
        return _loop_experts(t, scores.gather(1, ids), ids, self.experts).view_as(x)


class _RowOfTableBiasMoE(_BroadcastBiasMoE):
    """The bias a row of a ``[1, E]`` statistics table, detached (ERNIE-4.5's remote code)."""

    def __init__(self):
        super().__init__()
        del self.e_score_correction_bias
        self.e_score_correction_bias = nn.Parameter(torch.randn(1, EXPERTS))

    def forward(self, x):
        t = x.reshape(-1, HIDDEN)
        scores = self.gate(t).sigmoid()
        ids = (scores + self.e_score_correction_bias[0].detach()).topk(TOP_K, dim=-1).indices
        return _loop_experts(t, scores.gather(1, ids), ids, self.experts).view_as(x)


@pytest.mark.parametrize("block_class", [_BroadcastBiasMoE, _ViewedScoresBiasMoE, _RowOfTableBiasMoE])
def test_explain_names_a_correction_bias_added_through_a_view(block_class):
    block = init_normal(block_class(), 0)
    report = autocal.explain(nn.Sequential(block))
    assert report.successful()
    assert report.blocks[0].correction_bias == "e_score_correction_bias"


class _ScaledOutputsMoE(nn.Module):
    """Each expert's output times a per-expert scale (a parameter) before its routing weight."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.experts = nn.ModuleList(SwiGLUExpert() for _ in range(EXPERTS))
        self.expert_scale = nn.Parameter(torch.rand(EXPERTS) + 0.5)

    def forward(self, x):
        t = x.reshape(-1, HIDDEN)
        weights, ids = self.gate(t).softmax(-1).topk(TOP_K, dim=-1)
        out = torch.zeros_like(t)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(ids == e)
            out[token] += expert(t[token]) * self.expert_scale[e] * weights[token, slot, None]
        return out.view_as(x)


def test_explain_reads_the_routing_weight_past_a_per_expert_scale():
    block = init_normal(_ScaledOutputsMoE(), 0)
    report = autocal.explain(nn.Sequential(block))
    assert report.successful()
    assert (report.blocks[0].scoring, report.blocks[0].top_k) == ("softmax", TOP_K)


def test_permanent_unpacking_reproduces_the_packed_tensors():
    block = make_toy_block(ToyMoEConfig(kind="interleaved"))
    packed = {n: p.detach().clone() for n, p in block.experts.named_parameters()}
    module = autocal.synthesize(block)
    experts = module.expert_modules()
    gate_up = torch.stack([torch.stack([e.gate_proj.weight.T, e.up_proj.weight.T], -1).flatten(-2) for e in experts])
    down = torch.stack([e.down_proj.weight.T for e in experts])
    assert torch.equal(gate_up, packed["gate_up_proj"]) and torch.equal(down, packed["down_proj"])
    assert main_output(module(example_hidden_states(ToyMoEConfig(kind="interleaved")))).isfinite().all()


def test_unpacked_linears_are_what_nn_linear_makes():
    """Unpacked Linears are made without ``nn.Linear.__init__`` (``synthesize/unpack.unpack_linear``): they hold
    the attributes one it makes holds, print and save as it does, and compute as it does."""
    module = autocal.synthesize(make_toy_block(ToyMoEConfig(kind="interleaved")))
    linear = module.expert_modules()[1].down_proj
    made = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
    assert vars(linear).keys() == vars(made).keys()
    assert repr(linear) == repr(made) and linear.state_dict().keys() == made.state_dict().keys()
    x = torch.randn(3, linear.in_features)
    made.weight, made.bias = linear.weight, linear.bias
    assert torch.equal(linear(x), made(x))


def test_converting_a_block_itself_says_what_to_do_instead():
    block = make_toy_block(ToyMoEConfig())
    with pytest.raises(autocal.AutocalError, match="synthesize"):
        autocal.convert(block)


def test_convert_with_token_chunks_bounds_each_unrouted_call_and_keeps_the_output():
    config = ToyMoEConfig(kind="concat", num_experts=4, top_k=2)
    x = example_hidden_states(config, seq=13)
    model = nn.Sequential(make_toy_block(config))
    with torch.no_grad():
        expected = model(x)
    autocal.convert(model, calibration_chunk_size=3)
    assert model[0].calibration_chunk_size == 3
    calls: dict[str, list[int]] = {}
    handles = [linear.register_forward_pre_hook(lambda m, a, name=name: calls.setdefault(name, []).append(a[0].shape[0]))
               for name, linear in expert_linears(model).items()]
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for handle in handles:
            handle.remove()
    assert compare_outputs(expected, out)[2]
    assert len(calls) == len(expert_linears(model)) > 0
    for name, sizes in calls.items():
        assert sum(sizes) == 13, (name, sizes)  # every token, once
        assert len(sizes) >= 2 and sum(size > 3 for size in sizes) <= 1, (name, sizes)  # only the routed call over 3


def test_token_chunks_on_a_module_that_cannot_chunk_warn_and_name_it():
    model = nn.Sequential(make_toy_block(ToyMoEConfig(kind="modulelist_loop")))
    autocal.convert(model)
    with pytest.warns(UserWarning, match="cannot run their experts in token chunks"):
        assert autocal.set_calibration_chunk_size(model, 8) == ["0"]
    assert autocal.set_calibration_chunk_size(model, None) == []  # no bound asked: nothing to warn about


@pytest.mark.parametrize("tokens", [0, -1, 2.5, True, "8"])
def test_token_chunks_must_be_a_positive_int(tokens):
    model = nn.Sequential(make_toy_block(ToyMoEConfig()))
    autocal.convert(model)
    with pytest.raises(ValueError, match="positive int"):
        autocal.set_calibration_chunk_size(model, tokens)
    assert model[0].calibration_chunk_size is None


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "attention_heads"])
def test_every_module_can_be_called_again_by_parameter_name(kind):
    """A tool may replay a module's call by parameter name, as LLM Compressor's AWQ replays the parent of the
    Linears it balances: ``inspect.signature(module.forward).bind(*args, **kwargs)``, then ``module(**bound)``.
    Every module of a calibration block, the block included, must declare its parameters for that."""
    config = ToyMoEConfig(kind=kind)
    model = nn.Sequential(make_toy_block(config))
    autocal.convert(model)
    x = example_hidden_states(config, seq=5)
    calls = {}

    def copy(value):  # the model may change a tensor in place after the call
        return value.clone() if isinstance(value, torch.Tensor) else value

    def record(name):
        def hook(module, args, kwargs, output):
            calls.setdefault(name, (module, tuple(map(copy, args)), {k: copy(v) for k, v in kwargs.items()},
                                    main_output(output).clone()))
        return hook

    handles = [m.register_forward_hook(record(n), with_kwargs=True) for n, m in model[0].named_modules()]
    try:  # replayed with the hooks still on, so every call computes as the first did
        with torch.no_grad():
            model(x)
        assert "" in calls and len(calls) > 1
        for name, (module, args, kwargs, output) in calls.items():
            arguments = inspect.signature(module.forward).bind(*args, **kwargs).arguments
            arguments |= arguments.pop("kwargs", {})
            with torch.no_grad():
                again = module(**arguments)
            assert torch.equal(main_output(again), output), f"{kind}: {name or 'the block'}"
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "attention_heads"])
def test_a_deep_copy_of_a_converted_model_runs_as_the_model_does(kind):
    """``copy.deepcopy`` (evaluation harnesses and quantizers copy models): the copy calibrates as the model
    does, every expert Linear seeing every token once, and holds its own weights."""
    config = ToyMoEConfig(kind=kind)
    model = nn.Sequential(make_toy_block(config))
    autocal.convert(model)
    twin = copy.deepcopy(model)
    x = example_hidden_states(config, seq=5)
    linears = expert_linears(twin)
    with torch.no_grad(), count_rows(linears) as rows:
        copied = twin(x)
    assert linears and set(rows.values()) == {5}, rows
    with torch.no_grad(), count_rows(expert_linears(model)):
        expected = model(x)
    # within rounding: deep-copying a Parameter clones it, so a copy's Linears no longer view the packed
    # weights, and the copy calls them one by one where the model runs the packed matmul
    assert compare_outputs(expected, copied)[2]
    with torch.no_grad():
        next(iter(linears.values())).weight.add_(1.0)
    assert not torch.equal(next(iter(linears.values())).weight, next(iter(expert_linears(model).values())).weight)


class _AuxListMoE(nn.Module):
    """A training framework's block: each forward appends its load-balancing loss to a list the model sums, counts
    its calls and keeps its last routing."""

    def __init__(self):
        super().__init__()
        from autocal.testing.corpus import ENTRIES

        self.inner = ENTRIES["mixtral_reference"].build(0)
        self.gate, self.experts = self.inner.gate, self.inner.experts
        self.aux_losses, self.calls, self.last_routing = [], 0, None

    def forward(self, x):
        t = x.reshape(-1, x.shape[-1])
        probs = self.gate(t).softmax(dim=-1)
        weights, chosen = probs.topk(2, dim=-1)
        self.aux_losses.append(probs.mean(0).square().sum())
        self.calls, self.last_routing = self.calls + 1, chosen
        out = torch.zeros_like(t)
        for i, expert in enumerate(self.experts):
            rows, slot = torch.where(chosen == i)
            out[rows] += weights[rows, slot, None] * expert(t[rows])
        return out.view_as(x)


def test_convert_leaves_what_the_blocks_forward_keeps_as_it_was():
    """Detection and verification run the block many times: its aux-loss list, call count and last routing are
    what they were before ``convert``; the forward then keeps them as it did."""
    block = _AuxListMoE()
    del block.inner
    model = nn.Sequential(block)
    losses = block.aux_losses
    autocal.convert(model)
    assert block.aux_losses is losses and losses == [] and block.calls == 0 and block.last_routing is None
    model(torch.randn(2, 3, 16))
    assert len(losses) == 1


@pytest.mark.parametrize("name, applied", [
    ("host_counts", "on the experts' combined outputs, after the loop"),  # outs.view(T, k, H).mul_(w).sum(1)
    ("dense_buffer", "on the experts' combined outputs, after the loop"),  # einsum with a dense [T, E] matrix
    ("keyword_experts", "handed to the experts beside their rows"),  # expert(hidden_states=rows, scale=w)
])
def test_explain_says_where_routing_weights_meet_experts_a_loop_does_not_scale(name, applied):
    from autocal.testing.corpus import ENTRIES, Holder

    report = autocal.explain(Holder(ENTRIES[name].build(0)), verify=False)
    assert report.blocks[0].structure["experts"]["weights_applied"] == applied


class _NamedExpertsMoE(nn.Module):
    """Experts in a ModuleDict keyed by name, two of the names also attributes of autocal's own containers."""

    NAMES = ("math", "code", "experts", "law", "chat", "wiki")

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.experts = nn.ModuleDict({name: SwiGLUExpert() for name in self.NAMES})

    def forward(self, x):
        t = x.reshape(-1, HIDDEN)
        weights, chosen = self.gate(t).softmax(dim=-1).topk(TOP_K, dim=-1)
        out = torch.zeros_like(t)
        for e, name in enumerate(self.NAMES):
            token, slot = torch.where(chosen == e)
            if token.numel():
                out.index_add_(0, token, self.experts[name](t[token]) * weights[token, slot, None])
        return out.view_as(x)


def test_experts_keyed_by_names_that_autocal_containers_also_use():
    """An expert named ``code`` or ``experts`` is an expert: calibrated like the others, and explain shows the
    generated code, not the module."""
    block = init_normal(_NamedExpertsMoE(), 0)
    x = torch.randn(1, 5, HIDDEN)
    with torch.no_grad():
        expected = block(x)
    calibration = autocal.synthesize(block)
    assert isinstance(calibration.code, str)
    with torch.no_grad(), count_rows(expert_linears(calibration)) as rows:
        assert torch.allclose(calibration(x), expected, atol=1e-6)
    assert set(rows.values()) == {5} and len(rows) == 3 * EXPERTS
    report = autocal.explain(init_normal(_NamedExpertsMoE(), 0))
    assert report.blocks[0].failure is None and report.blocks[0].num_experts == EXPERTS


class _StatisticsHolderMoE(nn.Module):
    """A child holding only the statistics the router reads (``moe_statics``, no forward of its own) and an
    activation module the experts' code applies: neither is a shared expert."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.moe_statics = nn.Module()
        self.moe_statics.e_score_correction_bias = nn.Parameter(torch.randn(1, EXPERTS))
        self.act_fn = nn.SiLU()
        self.experts = nn.ModuleList(SwiGLUExpert() for _ in range(EXPERTS))
        self.shared_experts = SwiGLUExpert()

    def forward(self, x):
        t = x.reshape(-1, HIDDEN)
        scores = self.act_fn(self.gate(t)).sigmoid()
        ids = (scores + self.moe_statics.e_score_correction_bias[0].detach()).topk(TOP_K, dim=-1).indices
        return (_loop_experts(t, scores.gather(1, ids), ids, self.experts) + self.shared_experts(t)).view_as(x)


def test_shared_modules_are_children_computing_on_tokens_with_weights_of_their_own():
    report = autocal.explain(nn.Sequential(init_normal(_StatisticsHolderMoE(), 0)))
    assert report.successful()
    assert report.blocks[0].structure["shared_modules"] == ["shared_experts"]
    assert report.blocks[0].correction_bias == "moe_statics.e_score_correction_bias"
