"""Which module is the MoE block: the one whose forward routes, never a parent that only calls it or a container."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import autocal
from autocal import MoECalibrationModule
from autocal.rules import find_moe_blocks
from autocal.testing.corpus import ENTRIES, Holder, Mixed


def _found(model: nn.Module) -> list[str]:
    return [path for path, _ in find_moe_blocks(model)]


def test_a_decoder_layer_around_a_packed_block_is_not_the_block():
    layer = ENTRIES["decoder_layer"].build(0)
    assert _found(layer) == ["moe"]


def test_layers_in_a_sequential_or_a_modulelist_give_their_moe_blocks():
    assert _found(ENTRIES["sequential_layers"].build(0)) == ["0.moe", "1.moe", "2.moe"]
    assert _found(ENTRIES["modulelist_model"].build(0)) == ["layers.0.moe", "layers.1.moe", "layers.2.moe"]


def test_the_model_beside_a_toy_block_is_not_the_block():
    assert _found(Mixed(ENTRIES["packed_loop"].build(0), seed=0)) == ["toy", "block"]


def test_a_container_is_never_a_block():
    norm = nn.RMSNorm(ENTRIES["packed_loop"].build(0).router.in_features)
    assert _found(nn.Sequential(norm, ENTRIES["packed_loop"].build(0))) == ["1"]
    assert _found(nn.ModuleList([norm, ENTRIES["packed_loop"].build(0)])) == ["1"]


def _pass_through(class_name: str) -> type:
    """Register (and return) a hand-written calibration module for ``class_name`` that runs the original."""

    @MoECalibrationModule.register(class_name)
    class HandWritten(MoECalibrationModule):
        def __init__(self, original, config, calibrate_all_experts=True):
            super().__init__()
            self.inner = original
            self.calibrate_all_experts = calibrate_all_experts

        def forward(self, *args, **kwargs):
            return self.inner(*args, **kwargs)

    return HandWritten


@pytest.fixture
def override():
    registered = []

    def register(class_name: str) -> type:
        registered.append(class_name)
        return _pass_through(class_name)

    yield register
    for name in registered:
        MoECalibrationModule.unregister(name)


def test_an_override_is_used_for_a_block_detection_does_not_find(override):
    hand_written = override("MixtralReferenceMoE")
    model = Holder(ENTRIES["conv1d_experts"].build(0))
    args, _ = ENTRIES["conv1d_experts"].inputs(2, 5)
    with torch.no_grad():
        expected = model(*args)
    autocal.convert(model)
    assert isinstance(model.block, hand_written)
    with torch.no_grad():
        torch.testing.assert_close(model(*args), expected, rtol=0, atol=0)
    report = autocal.explain(Holder(ENTRIES["conv1d_experts"].build(0)), verify=False)
    assert [(b.paths, b.how) for b in report.blocks] == [(["block"], "registered override")]


def test_an_override_wins_over_the_block_detection_finds_inside_it(override):
    hand_written = override("DecoderLayer")
    model = ENTRIES["sequential_layers"].build(0)
    assert _found(model) == ["0", "1", "2"]
    autocal.convert(model)
    assert all(isinstance(layer, hand_written) for layer in model)
    assert not any(isinstance(m, MoECalibrationModule) for m in model[0].inner.modules())

