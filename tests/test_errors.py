"""Errors a new user meets name the real problem (issue 17, item 6).

Each case used to surface as an error of another kind, or as a bare exception from
deep inside: the error now has the kind that fits, keeps what was raised as its
``__cause__`` where something was raised, and its next step fits the kind.
"""

import copy

import pytest
import torch
from torch import nn

import autocal
from autocal.integrations import llmcompressor as alc
from autocal.testing import zoo
from autocal.testing.toy_moe import ToyMoEConfig, make_toy_block


def test_experts_in_another_dtype_than_the_router_name_the_dtypes_and_keep_the_error():
    model = zoo.build_model("qwen3_moe")
    for layer in model.model.layers:
        layer.mlp.experts.to(torch.bfloat16)
    with pytest.raises(autocal.AutocalError) as caught:
        autocal.convert(model)
    error = caught.value
    assert error.kind == autocal.errors.TRACE_FAILED
    assert "bfloat16 (experts)" in error.explanation and "float32 (gate)" in error.explanation
    assert isinstance(error.__cause__, RuntimeError) and "dtype" in str(error.__cause__)
    assert str(error.__cause__) in error.explanation
    assert any("one dtype" in hint for hint in error.hints)


@pytest.mark.parametrize("entry", ["convert", "explain"])
def test_example_inputs_that_are_not_a_dict_are_a_bad_input(entry):
    model = zoo.build_model("qwen3_moe")
    ids = zoo.example_inputs(model)["input_ids"]
    with pytest.raises(autocal.AutocalError) as caught:
        getattr(autocal, entry)(model, example_inputs=ids)
    assert caught.value.kind == autocal.errors.BAD_INPUT
    assert "example_inputs is a Tensor" in caught.value.explanation and "dict" in caught.value.explanation
    assert not any(isinstance(m, autocal.MoECalibrationModule) for m in model.modules())


def test_a_tokenizer_style_mapping_is_taken_as_example_inputs():
    from collections import UserDict  # transformers' BatchEncoding is a UserDict

    model = zoo.build_model("qwen3_moe")
    autocal.convert(model, example_inputs=UserDict(zoo.example_inputs(model)))
    assert isinstance(model.model.layers[0].mlp, autocal.MoECalibrationModule)


def test_explain_reports_converted_blocks_as_converted_with_their_original_class():
    model = zoo.build_model("qwen3_moe")
    original = type(model.model.layers[0].mlp).__name__
    autocal.convert(model)
    report = autocal.explain(model)
    assert report.successful(), str(report)
    (block,) = report.blocks
    assert block.converted and block.block_class == original
    assert block.calibration_class == type(model.model.layers[0].mlp).__name__
    assert block.paths == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert "already converted by autocal" in str(report) and "FAILED" not in str(report)


def test_explain_next_step_fits_the_kind():
    block = make_toy_block(ToyMoEConfig())
    block.experts.forward = block.experts.forward  # a replaced forward on the instance, as accelerate's hooks do
    report = autocal.explain(nn.Sequential(block))
    (entry,) = report.blocks
    assert entry.failure["kind"] == autocal.errors.HOOKED_MODULE
    next_steps = [line for line in str(report).splitlines() if line.lstrip().startswith("next:")]
    assert next_steps and all("before dispatching" in line for line in next_steps), str(report)
    assert "register" not in str(report)


def test_next_steps_of_each_kind():
    assert autocal.errors.next_steps(autocal.errors.UNSUPPORTED_DISPATCH, "X") == [autocal.errors.override_hint("X")]
    assert autocal.errors.next_steps(autocal.errors.UNSUPPORTED_DISPATCH, "X", ["own hint"]) == ["own hint"]
    for kind in (autocal.errors.HOOKED_MODULE, autocal.errors.TRACE_FAILED, autocal.errors.BAD_INPUT):
        assert "register" not in autocal.errors.next_steps(kind, "X")[0]


def test_saving_a_model_that_was_never_prepared_says_to_prepare_it(tmp_path):
    model = zoo.build_model("qwen3_moe")
    target = tmp_path / "never-written"
    with pytest.raises(autocal.AutocalError) as caught:
        alc.save_pretrained(model, target, save_compressed=False)
    assert caught.value.kind == autocal.errors.BAD_INPUT
    assert any("autocal_lc.prepare(model)" in hint for hint in caught.value.hints)
    assert not target.exists()


def test_a_block_whose_output_is_random_is_refused_as_such():
    """Tokens past an expert's capacity dropped at random, in eval mode too: routing is not random, so the rules
    take the block; the original gives another output each run, which verification says, not a bare mismatch."""
    from autocal.testing.corpus import ENTRIES

    model = ENTRIES["variadic_forward"].build(0)
    model.moe_layer.gate.capacity_factor = 1.0
    with pytest.raises(autocal.AutocalError) as caught:
        autocal.convert(model)
    error = caught.value
    assert error.kind == autocal.errors.VERIFICATION_FAILED
    assert "different outputs when run twice on the same input" in error.explanation
    assert any("deterministic" in hint for hint in error.hints)
    assert not isinstance(model.moe_layer, autocal.MoECalibrationModule)


def test_experts_compiled_one_by_one_are_named_as_compiled():
    """``experts[i] = torch.compile(expert)``: the error names the compile wrappers, not an offloading hook."""
    from autocal.testing.corpus import ENTRIES

    model = nn.Sequential(ENTRIES["mixtral_reference"].build(0))
    for i, expert in enumerate(model[0].experts):
        model[0].experts[i] = torch.compile(expert, backend="eager")
    with pytest.raises(autocal.AutocalError) as caught:
        autocal.convert(model)
    assert caught.value.kind == autocal.errors.HOOKED_MODULE
    assert "torch.compile wrappers" in caught.value.explanation and "experts.0" in caught.value.explanation
    assert any("torch.compile" in hint for hint in caught.value.hints)


def test_torchscript_experts_are_named_as_the_reason():
    """Scripted experts have no Python forward to record or hook: both entry points say so, not something else."""
    from autocal.testing.corpus import HIDDEN, MixtralReferenceMoE, init_normal

    block = init_normal(MixtralReferenceMoE(), 0)
    block.experts = nn.ModuleList(torch.jit.script(expert) for expert in block.experts)
    with pytest.raises(autocal.AutocalError, match="TorchScript modules") as raised:
        autocal.synthesize(block)
    assert raised.value.kind == autocal.errors.HOOKED_MODULE
    with pytest.raises(autocal.AutocalError, match="TorchScript modules"):
        autocal.convert(nn.Sequential(block), example_inputs={"input": torch.randn(1, 3, HIDDEN)}, strict=True)


class _FunctionalExpertsMoE(nn.Module):
    """Experts run by ``torch.func.functional_call`` on a template module with each expert's parameters: the
    experts' own modules are never called."""

    def __init__(self, hidden=16, experts=4):
        super().__init__()
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(hidden, 8), nn.GELU(), nn.Linear(8, hidden))
                                     for _ in range(experts))
        self.__dict__["template"] = copy.deepcopy(self.experts[0])  # unregistered: no module of the block

    def forward(self, x):
        b, s, h = x.shape
        t = x.reshape(-1, h)
        weights, chosen = self.gate(t).softmax(-1).topk(2, dim=-1)
        out = torch.zeros_like(t)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            rows = torch.func.functional_call(self.template, dict(expert.named_parameters()), (t[token],))
            out.index_add_(0, token, rows * weights[token, slot, None])
        return out.view(b, s, h)


def test_experts_never_called_as_modules_on_made_up_inputs_are_named_not_the_input_shape():
    """Before, the error blamed a made-up shape the forward could not unpack, though the first shape ran."""
    with pytest.raises(autocal.AutocalError, match="never calls a module in `experts`") as raised:
        autocal.synthesize(_FunctionalExpertsMoE())
    assert "ValueError" not in raised.value.explanation
