"""The example inputs autocal makes for a transformers model when it is given none (trace/model_inputs.py)."""

import torch

import autocal
from autocal.testing import zoo
from autocal.trace import model_inputs
from autocal.testing.toy_moe import ToyMoEConfig, make_toy_block


def test_token_ids_avoid_every_special_token_and_the_mask_follows_the_signature():
    model = zoo.build_model("qwen3_vl_moe", device="meta")
    candidates, forward = model_inputs.model_example(model)
    full = candidates[0]
    special = model_inputs._special_token_ids(model.config)
    assert forward is model and special  # image / video placeholders are special ids
    assert not set(full["input_ids"].flatten().tolist()) & special
    assert torch.equal(full["attention_mask"], torch.ones_like(full["input_ids"]))
    assert torch.equal(full["mm_token_type_ids"], torch.zeros_like(full["input_ids"]))
    assert set(candidates[-1]) == {"input_ids"}  # the fallback: the main input alone


def test_an_expert_index_input_is_found_from_the_forward_signature():
    candidates, _ = model_inputs.model_example(zoo.build_model("vitpose_backbone"))
    assert set(candidates[0]) == {"pixel_values", "dataset_index"}
    assert candidates[0]["dataset_index"].tolist() == [0, 1]


def test_no_model_run_beyond_the_twin_budget_or_outside_transformers(monkeypatch):
    assert model_inputs.model_example(make_toy_block(ToyMoEConfig())) is None
    monkeypatch.setattr(model_inputs, "TWIN_BUDGET", 0)
    assert model_inputs.model_example(zoo.build_model("qwen3_moe", device="meta")) is None
    assert model_inputs.model_example(zoo.build_model("qwen3_moe")) is not None  # real weights: no twin needed


def test_a_block_that_needs_the_models_inputs_converts_without_any():
    """DeepSeek-V4's hash-routed layers take input_ids: analysed on the model's own call."""
    model = zoo.build_model("deepseek_v4")
    inputs = zoo.example_inputs(model)
    with torch.no_grad():
        expected = model(**inputs).logits
    autocal.convert(model)
    for module in model.modules():
        if isinstance(module, autocal.MoECalibrationModule):
            module.calibrate_all_experts = False
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, expected)
