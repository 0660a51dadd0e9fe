"""No MoE block is skipped silently, and autocal raises nothing but ``AutocalError``.

``convert`` refuses a model with a module routing among experts that no rule
converts, naming it; ``strict=False`` leaves it, warns and lists it
(``autocal.unconverted``); ``explain`` shows it as a failure.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autocal
from autocal import MoECalibrationModule
from autocal.testing.corpus import HIDDEN, ENTRIES, EinsumExperts, GShardTop2MoE, Holder, Mixed, MixtralReferenceMoE, \
    TransposedConv1D, TransposedConvExpert, _holder, init_normal
from autocal.testing.assertions import expert_linears
from autocal.testing.patterns import PATTERNS
from autocal.testing.toy_moe import ToyConcatExperts, ToyLlama4Experts, ToyMoEConfig, make_toy_block
from autocal.verify import verify


class _AllExperts(nn.Module):
    """One projection of every expert, run on every token: ``[E, tokens, out]``."""

    def __init__(self, experts: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, out_features, in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("...ti,eoi->e...to", x, self.weight)


class _SplitProjections(nn.Module):
    """fc1/fc2 of every expert, and an output scale of the module's own beside them."""

    def __init__(self, experts: int = 4, hidden: int = 16, width: int = 24) -> None:
        super().__init__()
        self.fc1, self.fc2 = _AllExperts(experts, hidden, width), _AllExperts(experts, width, hidden)
        self.scale = nn.Parameter(torch.empty(hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        hidden = torch.nn.functional.gelu(self.fc1(t))
        return torch.einsum("eeto->eto", self.fc2(hidden)) * self.scale  # expert e on its own


class _UnreadExperts(nn.Module):
    """Top-2 routing over experts split into fc1/fc2 modules one level below a holder that also scales their
    outputs, every expert run densely: the router sits two levels above the expert weights, and no rule reads such
    experts (without the scale, the projections are read as an experts module's, ``index_copy_bmm`` in the
    corpus)."""

    def __init__(self, experts: int = 4, hidden: int = 16) -> None:
        super().__init__()
        self.router = nn.Linear(hidden, experts, bias=False)
        self.experts = _SplitProjections(experts, hidden)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        t = hidden_states.reshape(-1, hidden_states.shape[-1])
        scores = self.router(t).softmax(-1)
        weights = torch.zeros_like(scores).scatter(1, scores.topk(2, dim=-1).indices, 1.0) * scores
        return torch.einsum("te,eto->to", weights, self.experts(t)).view_as(hidden_states)


class _Wrapper(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.inner(t)


def test_experts_no_rule_reads_below_a_wrapper_are_named():
    """The unread experts' projections one level further down, in a module that only wraps them: still named
    (a wrapper holding nothing else does not count as a level between the router and the expert weights)."""
    block = init_normal(_UnreadExperts(), 0)
    block.experts = _Wrapper(block.experts)
    with pytest.raises(autocal.AutocalError) as raised:
        autocal.convert(Mixed(block, seed=0))
    assert raised.value.module_path == "block" and raised.value.kind == autocal.errors.UNSUPPORTED_DISPATCH


class _AttributeExperts(nn.Module):
    """Experts held as attributes of the block (``setattr(self, f"expert_{i}", ...)``), no list around them, fetched
    by ``getattr`` in a where loop beside a top-2 router: no rule reads experts that no list holds."""

    def __init__(self, experts: int = 4, hidden: int = 16) -> None:
        super().__init__()
        self.count = experts
        self.router = nn.Linear(hidden, experts, bias=False)
        for e in range(experts):
            setattr(self, f"expert_{e}", nn.Sequential(nn.Linear(hidden, 24), nn.GELU(), nn.Linear(24, hidden)))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        t = hidden_states.reshape(-1, hidden_states.shape[-1])
        weights, chosen = self.router(t).softmax(-1).topk(2, dim=-1)
        out = torch.zeros_like(t)
        for e in range(self.count):
            token, slot = torch.where(chosen == e)
            out[token] += weights[token, slot, None] * getattr(self, f"expert_{e}")(t[token])
        return out.view_as(hidden_states)


def test_experts_held_as_attributes_are_named():
    """Experts that are attributes of the block, beside a convertible block: convert named nothing and converted the
    rest (the block was no candidate: no list holds its experts); it now refuses, naming the block, and explain
    shows it as a failure."""
    with pytest.raises(autocal.AutocalError) as raised:
        autocal.convert(Mixed(init_normal(_AttributeExperts(), 0), seed=0))
    assert raised.value.module_path == "block" and raised.value.kind == autocal.errors.UNSUPPORTED_DISPATCH
    assert "attributes" in raised.value.explanation
    report = autocal.explain(Mixed(init_normal(_AttributeExperts(), 0), seed=0), verify=False)
    assert [b.paths for b in report.blocks if not b.ok] == [["block"]]


class _StreamGates(nn.Module):
    """One gate per stream (q, k, v, mlp), of one class, held as attributes beside a ``[4, hidden]`` mixing weight,
    as Inkling2-Loop's decoder layer holds its message gates: the structure of experts held as attributes, but
    every gate sees every row (no routing)."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.mixing = nn.Parameter(torch.randn(4, hidden))
        for name in ("q_gate", "k_gate", "v_gate", "mlp_gate"):
            setattr(self, name, nn.Sequential(nn.Linear(hidden, 24), nn.GELU(), nn.Linear(24, hidden)))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gates = (self.q_gate, self.k_gate, self.v_gate, self.mlp_gate)
        return hidden_states + sum(g(hidden_states) * w for g, w in zip(gates, self.mixing))


def test_modules_of_one_class_that_see_every_row_are_no_experts():
    """The attribute-experts structure without routing (each gate on every row): converted without a word about it,
    the neighbouring MoE block converted, the output unchanged."""
    model = Mixed(init_normal(_StreamGates(), 0), seed=0)
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)
    autocal.convert(model)
    assert isinstance(model.toy, MoECalibrationModule) and type(model.block) is _StreamGates
    assert autocal.unconverted(model) == []
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)


def _mixed(name: str) -> Mixed:
    return Mixed(ENTRIES[name].build(0), seed=0)


def _unread() -> Mixed:
    return Mixed(init_normal(_UnreadExperts(), 0), seed=0)


class _HashRoutedExperts(nn.Module):
    """Hash layers: each token's expert looked up in a fixed table by its token id, no router weight at all."""

    def __init__(self, experts: int = 4, hidden: int = 16, vocab: int = 50) -> None:
        super().__init__()
        self.register_buffer("expert_of_token", torch.arange(vocab) % experts)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(hidden, 24), nn.GELU(), nn.Linear(24, hidden))
                                     for _ in range(experts))

    def forward(self, hidden_states: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        t, route = hidden_states.reshape(-1, hidden_states.shape[-1]), self.expert_of_token[input_ids.reshape(-1)]
        out = torch.zeros_like(t)
        for e, expert in enumerate(self.experts):
            rows = (route == e).nonzero().squeeze(-1)
            out[rows] = expert(t[rows])
        return out.view_as(hidden_states)


class _HashModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.toy = make_toy_block(ToyMoEConfig(hidden_size=16), seed=0)
        self.block = init_normal(_HashRoutedExperts(), 0)

    def forward(self, hidden_states: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        return self.block(self.toy(hidden_states), input_ids)


def test_experts_looked_up_by_token_id_are_named():
    """Hash routing beside a convertible block: no router weight, so the block was no candidate, and convert
    converted the toy block and said nothing of these experts; it now refuses, naming the table."""
    example = {"hidden_states": torch.randn(2, 5, 16), "input_ids": torch.randint(0, 50, (2, 5))}
    with pytest.raises(autocal.AutocalError) as raised:
        autocal.convert(_HashModel(), example_inputs=example)
    assert raised.value.module_path == "block" and raised.value.kind == autocal.errors.UNSUPPORTED_DISPATCH
    assert "`expert_of_token`" in raised.value.explanation


def test_convert_names_experts_no_rule_converts_and_converts_nothing():
    model = _unread()
    with pytest.raises(autocal.AutocalError) as raised:
        autocal.convert(model)
    error = raised.value
    assert error.kind == autocal.errors.UNSUPPORTED_DISPATCH
    assert error.module_path == "block" and error.block_class == type(model.block).__name__
    assert "strict=False" in str(error)
    assert not any(isinstance(m, MoECalibrationModule) for m in model.modules()), "nothing is converted"


def test_strict_false_converts_the_rest_and_lists_what_it_left():
    model = _unread()
    args = (torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0)),)
    with torch.no_grad():
        expected = model(*args)
    with pytest.warns(UserWarning, match="block"):
        autocal.convert(model, strict=False)
    assert isinstance(model.toy, MoECalibrationModule)
    assert not isinstance(model.block, MoECalibrationModule)
    assert [(u.path, u.block_class) for u in autocal.unconverted(model)] == [("block", "_UnreadExperts")]
    for module in model.modules():
        if isinstance(module, MoECalibrationModule):
            module.calibrate_all_experts = False
    with torch.no_grad():
        torch.testing.assert_close(model(*args), expected, rtol=0, atol=0)


class _SlotMixingExperts(EinsumExperts):
    """Packed experts on GShard's dispatched tensor that centre each expert's hidden rows over its capacity slots:
    not row-wise, so no rule reads them (the dispatched rule checks that each slot's row is computed alone)."""

    def forward(self, x):
        hidden = F.gelu(torch.einsum("...nd,...dh->...nh", x, self.w1))
        return torch.einsum("...nh,...hd->...nd", hidden - hidden.mean(-2, keepdim=True), self.w2)


def _slot_mixing_gshard() -> GShardTop2MoE:
    block = GShardTop2MoE()
    block.experts = _SlotMixingExperts()
    return init_normal(block, 0).eval()


def test_strict_false_lists_a_block_no_rule_converts():
    model = Mixed(_slot_mixing_gshard(), seed=0)
    with pytest.warns(UserWarning, match="unsupported-dispatch"):
        autocal.convert(model, strict=False)
    assert [u.path for u in autocal.unconverted(model)] == ["block"]
    assert isinstance(model.toy, MoECalibrationModule)


def test_explain_shows_experts_no_rule_converts_as_a_failure():
    report = autocal.explain(_unread(), verify=False)
    failed = [b for b in report.blocks if not b.ok]
    assert [b.paths for b in failed] == [["block"]]
    assert failed[0].failure["kind"] == autocal.errors.UNSUPPORTED_DISPATCH


@pytest.mark.parametrize("name", list(ENTRIES))
def test_convert_raises_nothing_but_autocal_errors(name):
    """Every corpus entry, through convert (with its example inputs where it needs them): converted, or an
    AutocalError with a kind, the block and a next step, the original exception as its cause when there was one."""
    entry = ENTRIES[name]
    args, kwargs = entry.inputs(2, 5)
    model = _holder(entry, 0)
    try:
        autocal.convert(model, example_inputs={"hidden_states": args[0], **kwargs} if kwargs else None)
    except autocal.AutocalError as error:
        assert error.kind in autocal.errors.KINDS
        assert error.block_class
        assert autocal.errors.next_steps(error.kind, error.block_class, error.hints)
        if "could not follow the forward" in error.explanation.split(" (rule")[0]:
            assert error.__cause__ is not None and not isinstance(error.__cause__, autocal.AutocalError)


class _FastDecodeExperts(ToyConcatExperts):
    """Packed experts whose one-token path computes its experts apart, with a cheaper activation."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        if hidden_states.shape[0] > 1:
            return super().forward(hidden_states, top_k_index, top_k_weights)
        out = torch.zeros_like(hidden_states)
        for slot, expert in enumerate(top_k_index[0].tolist()):
            gate, up = F.linear(hidden_states, self.gate_up_proj[expert]).chunk(2, dim=-1)
            out += F.linear(gate * torch.sigmoid(1.7 * gate) * up, self.down_proj[expert]) * top_k_weights[0, slot]
        return out


def test_verification_runs_one_token_too():
    """The decode branch of a block (one token) is verified, not only the many-token path detection read."""
    block = make_toy_block(ToyMoEConfig())
    block.experts.__class__ = _FastDecodeExperts
    with pytest.raises(autocal.AutocalError) as raised:
        autocal.synthesize(block)
    assert raised.value.kind == autocal.errors.VERIFICATION_FAILED
    assert "1 tokens" in raised.value.explanation


class _DenseDecodeMoE(nn.Module):
    """Experts sliced per expert (``w[e]``) in a loop on many tokens; on one token every expert runs densely."""

    def __init__(self, experts: int = 4, hidden: int = 16, width: int = 24) -> None:
        super().__init__()
        self.router = nn.Linear(hidden, experts, bias=False)
        self.w1 = nn.Parameter(torch.randn(experts, width, hidden) / hidden ** 0.5)
        self.w2 = nn.Parameter(torch.randn(experts, hidden, width) / width ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.reshape(-1, x.shape[-1])
        weights, index = self.router(t).softmax(-1).topk(2, dim=-1)
        if t.shape[0] == 1:
            dense = torch.zeros(1, self.w1.shape[0]).scatter(1, index, weights)
            h = F.gelu(torch.einsum("th,ewh->tew", t, self.w1))
            return torch.einsum("te,tew,ehw->th", dense, h, self.w2).view_as(x)
        out = torch.zeros_like(t)
        for e in range(self.w1.shape[0]):
            token, slot = torch.where(index == e)
            y = F.linear(F.gelu(F.linear(t[token], self.w1[e])), self.w2[e])
            out.index_add_(0, token, y * weights[token, slot, None])
        return out.view_as(x)


def test_a_branch_detection_saw_but_does_not_follow_raises_without_verification():
    """Without verification too: the one-token recording shows the expert weights used without a gather, so the
    block is refused at convert time rather than converted with experts that miss those tokens."""
    torch.manual_seed(0)
    block = _DenseDecodeMoE().eval()
    with pytest.raises(autocal.AutocalError) as raised:
        autocal.synthesize(block, verify=False)
    assert raised.value.kind == autocal.errors.UNSUPPORTED_DISPATCH
    assert "on one token" in str(raised.value)


class _ScaledDenseExperts(ToyLlama4Experts):
    """Llama 4's dense experts with a per-expert output scale ``[E, 1, H]`` applied to all experts' outputs at once."""

    def __init__(self, config: ToyMoEConfig) -> None:
        super().__init__(config)
        self.post_scale = nn.Parameter(torch.rand(self.num_experts, 1, self.hidden_size) + 0.5)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states.view(self.gate_up_proj.shape[0], -1, self.hidden_size)
        gate, up = torch.bmm(hidden_states, self.gate_up_proj).chunk(2, dim=-1)
        return (torch.bmm(up * self.act_fn(gate), self.down_proj) * self.post_scale).view(-1, self.hidden_size)


def test_dense_experts_template_detection_saw_differ_raises_without_verification():
    """Experts run on every token (routing on their inputs): the cut-out template is replayed on the recorded
    rows of each expert, so one that does not give the recorded output is refused with verify=False too."""
    config = ToyMoEConfig(kind="scores_on_inputs")
    block = make_toy_block(config)
    experts = _ScaledDenseExperts(config)
    experts.gate_up_proj, experts.down_proj = block.experts.gate_up_proj, block.experts.down_proj
    block.experts = experts
    with pytest.raises(autocal.AutocalError) as raised:
        autocal.synthesize(block, verify=False)
    assert raised.value.kind == autocal.errors.UNSUPPORTED_EXPERT
    assert "more than autocal cut out" in raised.value.explanation


class _ScaledConv1D(TransposedConv1D):
    """A Linear class storing ``[in, out]`` weights that computes more than a Linear: no rule reads it."""

    def forward(self, x):
        return super().forward(x) * 0.5


class _ScaledConvExpert(TransposedConvExpert):
    def __init__(self):
        super().__init__()
        self.c_fc, self.c_proj = (_ScaledConv1D(*reversed(m.weight.shape)) for m in (self.c_fc, self.c_proj))


def test_experts_of_a_linear_class_no_rule_reads_are_never_skipped_silently():
    """A list of experts made of weight matrices and biases only, of a Linear class no rule reads (an ``[in, out]``
    addmm, then scaled), beside a router: named by convert, left and listed with ``strict=False``."""
    unread = lambda: Mixed(init_normal(MixtralReferenceMoE(_ScaledConvExpert), 0), seed=0)  # noqa: E731
    with pytest.raises(autocal.AutocalError) as raised:
        autocal.convert(unread())
    assert raised.value.module_path == "block" and raised.value.kind == autocal.errors.UNSUPPORTED_DISPATCH
    model = unread()
    with pytest.warns(UserWarning, match="block"):
        autocal.convert(model, strict=False)
    assert [u.path for u in autocal.unconverted(model)] == ["block"]


def test_experts_of_an_in_out_linear_class_convert():
    """The same experts without the scaling (``addmm(bias, x, weight)``, GPT-2's Conv1D) are Linears: converted."""
    model = _mixed("conv1d_transposed")
    autocal.convert(model)
    assert isinstance(model.block, MoECalibrationModule) and autocal.unconverted(model) == []


def _pattern_beside_a_convertible_block(name: str) -> Mixed:
    return Mixed(PATTERNS[name].make(), seed=0)


@pytest.mark.parametrize("name", ["functional_ensemble", "channels_first_conv"])
def test_experts_no_rule_reads_beside_a_convertible_block_are_named(name):
    """Experts no rule reads (modules run only through torch.func; conv experts on feature-first columns, routed
    by a kernel-1 conv), in a model that also holds a block autocal converts: convert names them, explain shows
    them as failures."""
    with pytest.raises(autocal.AutocalError) as raised:
        autocal.convert(_pattern_beside_a_convertible_block(name))
    assert raised.value.module_path == "block" and raised.value.kind == autocal.errors.UNSUPPORTED_DISPATCH
    report = autocal.explain(_pattern_beside_a_convertible_block(name), verify=False)
    assert [b.paths for b in report.blocks if not b.ok] == [["block"]]


class _FailingCalibration(MoECalibrationModule):
    def __init__(self, original: nn.Module, config=None, calibrate_all_experts: bool = True) -> None:
        super().__init__()
        self.original, self.calibrate_all_experts = original, calibrate_all_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrate_all_experts:
            raise RuntimeError("shape '[24, 16]' is invalid for input of size 528")
        return self.original(x)


def test_verification_states_what_the_calibration_module_raised():
    """A calibration module that raises where the original runs: a verification failure naming the exception, the
    original exception as its cause, never the raw exception."""
    block = make_toy_block(ToyMoEConfig())
    with pytest.raises(autocal.AutocalError) as raised:
        verify(block, _FailingCalibration(block), (torch.randn(2, 5, 16),))
    assert raised.value.kind == autocal.errors.VERIFICATION_FAILED
    assert "RuntimeError" in raised.value.explanation and isinstance(raised.value.__cause__, RuntimeError)
    assert raised.value.source and __file__.rsplit("/", 1)[-1] in raised.value.source


def test_synthesize_states_a_module_the_rules_show_is_no_moe():
    """``synthesize`` of a module the rules show is no MoE (convert skips such modules): a stated error."""
    with pytest.raises(autocal.AutocalError) as raised:
        autocal.synthesize(PATTERNS["masked_encoder"].make())
    assert raised.value.kind == autocal.errors.NO_MOE_BLOCK and "no MoE block" in raised.value.explanation


def test_a_model_whose_only_candidate_is_no_moe_is_told_why():
    """A soft MoE (experts on softmax mixtures of every token, no choice among them) is no block to rewrite: convert
    says the model holds none, naming the candidate it ruled out, where, and the rules' reason."""
    with pytest.raises(autocal.AutocalError) as caught:
        autocal.convert(Holder(PATTERNS["soft_slots"].make()))
    assert caught.value.kind == "no-moe-block"
    assert ("SoftSlotsMoE at `block`: no top-k, max or argmax of scores decides which experts run (nothing to "
            "rewrite)") in caught.value.explanation


@dataclasses.dataclass
class _RoutedOutput:
    """A block's output as a plain dataclass (no pytree registration)."""

    hidden_states: torch.Tensor
    router_probs: torch.Tensor


class _DataclassOutputMoE(MixtralReferenceMoE):
    def forward(self, hidden_states):
        out = super().forward(hidden_states)
        return _RoutedOutput(out, self.gate(hidden_states).softmax(-1))


def test_verification_compares_outputs_inside_a_dataclass():
    """A block returning a ``@dataclass`` is compared field by field: a calibration module whose output differs is
    refused (pytree takes an unregistered dataclass for one opaque leaf, equal to anything)."""
    block = _DataclassOutputMoE().eval()
    init_normal(block, 0)
    module = autocal.synthesize(block)
    assert isinstance(module(torch.randn(1, 3, HIDDEN)), _RoutedOutput)
    broken = autocal.synthesize(block, verify=False)
    forward = broken.forward
    broken.forward = lambda x: dataclasses.replace(forward(x), hidden_states=3 * forward(x).hidden_states)
    with pytest.raises(autocal.AutocalError, match="outputs differ"):
        verify(block, broken, (torch.randn(1, 5, HIDDEN),))


class _LowRank(nn.Module):
    def __init__(self, features_in: int, features_out: int):
        super().__init__()
        self.a, self.b = nn.Linear(features_in, 4, bias=False), nn.Linear(4, features_out, bias=False)

    def forward(self, x):
        return self.b(self.a(x))


class _ProjectionsSideBySide(nn.Module):
    """Each expert's three projections as modules of one flat ModuleDict (``experts_{i}_gate_proj`` …): the
    largest group of one kind (the gate and up projections, 2E of them) is not the experts."""

    def __init__(self, experts: int = 4):
        super().__init__()
        self.gate = nn.Linear(HIDDEN, experts, bias=False)
        self.experts = nn.ModuleDict()
        for i in range(experts):
            self.experts[f"experts_{i}_gate_proj"] = _LowRank(HIDDEN, 8)
            self.experts[f"experts_{i}_up_proj"] = _LowRank(HIDDEN, 8)
            self.experts[f"experts_{i}_down_proj"] = _LowRank(8, HIDDEN)

    def forward(self, x):
        t = x.reshape(-1, HIDDEN)
        weights, chosen = self.gate(t).softmax(dim=-1).topk(2, dim=-1)
        out = torch.zeros_like(t)
        for e in range(self.gate.out_features):
            token, slot = torch.where(chosen == e)
            rows = t[token]
            h = F.silu(self.experts[f"experts_{e}_gate_proj"](rows)) * self.experts[f"experts_{e}_up_proj"](rows)
            out.index_add_(0, token, self.experts[f"experts_{e}_down_proj"](h) * weights[token, slot, None])
        return out.view_as(x)


def test_projections_side_by_side_in_one_dict_are_refused_not_taken_for_experts():
    """Before, the 2E gate and up projections were taken for 2E experts (k 4, "covered 8/8"), and the down
    projections left short of tokens without a word."""
    x = torch.randn(1, 5, HIDDEN)
    with pytest.raises(autocal.AutocalError, match="one row per 3 entries") as raised:
        autocal.synthesize(_ProjectionsSideBySide(), example_inputs={"x": x})
    assert raised.value.kind == autocal.errors.UNSUPPORTED_DISPATCH
    for example in (None, {"input": x}):
        with pytest.raises(autocal.AutocalError, match="one row per 3 entries"):
            autocal.convert(nn.Sequential(_ProjectionsSideBySide()), example_inputs=example)
    report = autocal.explain(nn.Sequential(_ProjectionsSideBySide()))
    assert [b.failure["kind"] for b in report.blocks] == [autocal.errors.UNSUPPORTED_DISPATCH]


class _ProjectedLoopMoE(nn.Module):
    """A projection before the router and the experts (``pre``), expert weights of the block's own sliced in a loop
    (the gathered rule: calibration re-runs the block with its routing forced)."""

    def __init__(self, experts: int = 6):
        super().__init__()
        self.pre = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.router = nn.Linear(HIDDEN, experts, bias=False)
        self.w1 = nn.Parameter(torch.randn(experts, 12, HIDDEN) * 0.3)
        self.w2 = nn.Parameter(torch.randn(experts, HIDDEN, 12) * 0.3)

    def forward(self, x):
        t = self.pre(x.reshape(-1, HIDDEN))
        weights, chosen = self.router(t).softmax(-1).topk(2, dim=-1)
        out = torch.zeros_like(t)
        for e in range(self.w1.shape[0]):
            token, slot = torch.where(chosen == e)
            out.index_add_(0, token, F.silu(t[token] @ self.w1[e].T) @ self.w2[e].T * weights[token, slot, None])
        return out.view_as(x)


def test_forced_runs_keep_the_hooks_of_modules_before_the_routing_choice():
    """A hook that changes a value before the choice (here doubling ``pre``'s input) runs in the forced runs too:
    before, every module but the experts ran there without its hooks, and the experts were given inputs the block
    never computes, while the output and every coverage count stayed right."""
    torch.manual_seed(0)
    model = Holder(_ProjectedLoopMoE())
    model.block.pre.register_forward_pre_hook(lambda _, args: (args[0] * 2,))
    x = torch.randn(1, 9, HIDDEN)
    with torch.no_grad():
        real_inputs = model.block.pre(x.reshape(-1, HIDDEN))
    autocal.convert(model)
    seen = []
    for name, linear in expert_linears(model.block).items():
        if name.startswith("w1"):  # the experts' first projections
            linear.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach().clone()))
    with torch.no_grad():
        model(x)
    rows = torch.cat(seen)
    assert rows.shape[0] == 6 * 9
    assert all(any(torch.equal(row, real) for real in real_inputs) for row in rows)
