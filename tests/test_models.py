"""Real transformers models built from tiny fixture configs: whole-model logits before and after conversion."""

import pytest
import torch

import autocal
from autocal.testing import zoo
from autocal.testing.assertions import count_rows, expert_linears
from autocal.verify import compare_outputs

ARCHITECTURES = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss", "llama4"]


def _logits(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out[0]


def _checksums(model):
    return {name: p.detach().double().sum().item() for name, p in model.named_parameters()}


@pytest.fixture(params=ARCHITECTURES)
def architecture(request):
    if request.param not in zoo.moe_architectures():
        pytest.fail(f"{request.param} is not an MoE architecture of this transformers version")
    return request.param


def test_whole_model_logits(architecture):
    model = zoo.build_model(architecture)
    inputs = zoo.example_inputs(model, seq=8)
    reference = _logits(model, inputs)
    assert reference.abs().max() > 0

    autocal.convert(model)
    converted = [m for m in model.modules() if isinstance(m, autocal.MoECalibrationModule)]
    assert converted, "no block was converted"

    for module in converted:
        module.calibrate_all_experts = False
    assert torch.equal(_logits(model, inputs), reference), "calibration off must be bitwise the original"

    for module in converted:
        module.calibrate_all_experts = True
    linears = expert_linears(model)
    with count_rows(linears) as rows:
        calibrated = _logits(model, inputs)
    _, _, close = compare_outputs(reference, calibrated)
    assert close
    tokens = inputs["input_ids"].numel()
    assert all(n == tokens for n in rows.values()), {k: v for k, v in rows.items() if v != tokens}


def test_restore_gives_the_original_parameters_back(architecture):
    model = zoo.build_model(architecture)
    before = _checksums(model)
    blocks = {path: block for path, block in autocal.rules.find_moe_blocks(model)}
    autocal.convert(model)
    for path, block in blocks.items():
        module = model.get_submodule(path)
        assert module.restore() is block
    restored = {}
    for path, block in blocks.items():
        parent, _, name = path.rpartition(".")
        model.get_submodule(parent).add_module(name, block)
    restored = _checksums(model)
    assert restored == before


def test_experts_are_views_not_copies(architecture):
    model = zoo.build_model(architecture)
    packed = {p.untyped_storage().data_ptr() for p in model.parameters()}
    size_before = sum(p.numel() for p in model.parameters())
    autocal.convert(model)
    for linear in expert_linears(model).values():
        assert linear.weight.untyped_storage().data_ptr() in packed
    assert sum(p.numel() for p in model.parameters()) == size_before
