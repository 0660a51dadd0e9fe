"""Experts whose Linears are a class of their own (``F.linear`` on ``self.weight``): seen as ``nn.Linear`` views.

The corpus (tests/test_corpus.py) checks such blocks end to end; these tests pin
what the calibration module holds: real ``nn.Linear`` layers whose parameters
are the original's (the same objects, no copies), while the original block keeps
its own modules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from autocal import synthesize
from autocal.detect.linear_like import as_linear, linear_like, linear_orientation, made_of_linears
from autocal.rules import find_moe_blocks
from autocal.testing.corpus import ENTRIES, MultipliedExpert, ShardLinear, ShardMLP, TransposedConv1D


class ScaledLinear(nn.Module):
    """Holds a weight like a Linear, but computes something else with it."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 4))

    def forward(self, x):
        return F.linear(x, self.weight) * 2


def test_linear_like_is_read_from_the_forward():
    assert linear_like(ShardLinear(4, 3)) and linear_like(ShardLinear(4, 3, bias=True))
    assert not linear_like(ScaledLinear())
    assert not linear_like(nn.Linear(4, 3))  # already one: nothing to view


class MatmulLinear(nn.Module):
    """``weight [in, out]`` used as ``x @ weight`` (no bias); ``transposed`` uses it as ``x @ weight.t()``."""

    def __init__(self, size: int, transposed: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(size, size))
        self.transposed = transposed

    def forward(self, x):
        return x @ (self.weight.t() if self.transposed else self.weight)


class OffsetConv1D(TransposedConv1D):
    """``addmm`` of an ``[in, out]`` weight, plus one: affine, but not this weight's Linear."""

    def forward(self, x):
        return super().forward(x) + 1


def _normal(module: nn.Module) -> nn.Module:
    for param in module.parameters():
        nn.init.normal_(param)
    return module


def test_the_weight_orientation_is_read_from_what_the_forward_computes():
    """Square weights too: which side of the product the weight is on decides, not its shape."""
    assert linear_orientation(_normal(TransposedConv1D(3, 4))) == "matmul"
    assert linear_orientation(MatmulLinear(4)) == "matmul"
    assert linear_orientation(MatmulLinear(4, transposed=True)) == "linear"
    assert linear_orientation(_normal(ShardLinear(4, 3, bias=True))) == "linear"
    assert linear_orientation(_normal(OffsetConv1D(3, 4))) is None


def test_an_in_out_weight_becomes_a_transposed_view_of_the_same_storage():
    conv = _normal(TransposedConv1D(3, 4))
    linear = as_linear(conv)
    assert linear.weight.shape == (3, 4) and linear.weight.data_ptr() == conv.weight.data_ptr()
    assert linear.bias is conv.bias
    for x in (torch.randn(5, 4), torch.randn(2, 5, 4)):
        assert torch.equal(linear(x), conv(x))  # both are one addmm of the same operands
    with torch.no_grad():  # a quantizer writing into the Linear's weight writes the original's storage
        linear.weight.copy_(torch.ones(3, 4))
    assert torch.equal(conv.weight, torch.ones(4, 3))


def test_as_linear_shares_the_parameters_and_output():
    shard = ShardLinear(4, 3, bias=True)
    nn.init.normal_(shard.weight), nn.init.normal_(shard.bias)
    linear = as_linear(shard)
    assert linear.weight is shard.weight and linear.bias is shard.bias
    x = torch.randn(5, 4)
    assert torch.equal(linear(x), shard(x))


def test_experts_may_hold_parameters_beside_their_linears():
    assert made_of_linears(ShardMLP(4, 6)) and made_of_linears(MultipliedExpert(4, 6))
    assert not made_of_linears(nn.Sequential(ScaledLinear()))


def test_layers_with_a_norm_are_no_experts():
    """Two encoder layers in a holder, beside a [2, H] embedding (a 2-layer BERT's token types), are no MoE."""
    layer = lambda: nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))  # noqa: E731
    encoder = nn.Module()
    encoder.layer = nn.ModuleList([layer(), layer()])
    model = nn.Module()
    model.token_types, model.encoder = nn.Embedding(2, 4), encoder
    assert not made_of_linears(layer())
    assert list(find_moe_blocks(model)) == []


def test_layers_with_a_norm_beside_a_linear_are_no_experts():
    """Two encoder layers beside a pooler Linear reading their features: experts holding a norm need a router with
    one row per expert, so the model is no (last-resort) block."""
    layer = lambda: nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))  # noqa: E731
    encoder = nn.Module()
    encoder.layer = nn.ModuleList([layer(), layer()])
    model = nn.Module()
    model.encoder, model.pooler = encoder, nn.Linear(4, 4)
    assert made_of_linears(layer(), norms=True)
    assert list(find_moe_blocks(model)) == []


def test_calibration_module_holds_nn_linear_views_of_the_original_weights():
    block = ENTRIES["deepseek_reference"].build(0)
    module = synthesize(block)
    for original, expert in zip(block.experts, module.expert_modules()):
        for name in ("w1", "w2", "w3"):
            assert type(expert.get_submodule(name)) is nn.Linear
            assert expert.get_submodule(name).weight is original.get_submodule(name).weight
    assert all(type(e.w1) is ShardLinear for e in block.experts)  # the original keeps its own modules


def test_experts_with_no_linear_get_linear_views_of_their_own_weights():
    """Raw parameter matmuls and kernel-1 convolutions: each expert's Linears view its own weights."""
    for name in ("param_matmul_experts", "conv1d_experts"):
        block = ENTRIES[name].build(0)
        module = synthesize(block)
        for original, expert in zip(block.experts, module.expert_modules()):
            linears = [m for m in expert.modules() if type(m) is nn.Linear]
            viewed = {linear.weight.untyped_storage().data_ptr() for linear in linears}
            assert linears and viewed == {p.untyped_storage().data_ptr() for p in original.parameters() if p.dim() > 1}
        assert all(type(e) is type(block.experts[0]) for e in block.experts)  # the original keeps its experts
    assert module.structure.experts.computation.startswith("squeeze(movedim(down_proj(")  # read as Linears
