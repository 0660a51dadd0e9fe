"""Op recording: a leaf's call recorded inside its block's recording is what a recording of that call alone gives."""

import pytest
import torch

from autocal.testing import zoo
from autocal.testing.toy_moe import ToyMoEConfig, example_hidden_states, make_toy_block
from autocal.trace.hf import eager_experts
from autocal.trace.record import record, value


def _blocks():
    model = zoo.build_model("qwen3_moe")
    yield model.model.layers[0].mlp, "experts", torch.randn(2, 5, model.config.hidden_size)
    config = ToyMoEConfig()
    yield make_toy_block(config), "experts", example_hidden_states(config, batch=2, seq=5)


@pytest.mark.parametrize("index", [0, 1])
def test_a_nested_leaf_records_the_graph_its_call_alone_gives(index):
    block, name, x = list(_blocks())[index]
    leaf = block.get_submodule(name)
    with torch.no_grad(), eager_experts(block):
        outer = record(block, (x,), leaves=[leaf], nested=[leaf])
        call = next(n for n in outer.graph.nodes if n.op == "call_module" and n.target == name)
        alone = record(leaf, tuple(value(a) for a in call.args), {k: value(v) for k, v in call.kwargs.items()})
    inner = outer.nested[name]
    assert str(inner.graph) == str(alone.graph)
    assert list(inner.inputs) == list(alone.inputs)
    assert torch.equal(inner.output, alone.output) and torch.equal(inner.output, value(call))
    assert str(record(block, (x,), leaves=[leaf]).graph) == str(outer.graph), "the block's graph is unchanged"


def test_a_nested_leaf_that_raises_leaves_no_hook_behind():
    config = ToyMoEConfig()
    block = make_toy_block(config)
    leaf = block.get_submodule("experts")
    children = [m for m in leaf.modules() if m is not leaf]
    before = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in children]
    forward = type(leaf).forward

    def failing(self, *args, **kwargs):
        forward(self, *args, **kwargs)
        raise RuntimeError("after the experts ran")
    leaf.forward = failing.__get__(leaf)
    with pytest.raises(RuntimeError, match="after the experts ran"), torch.no_grad():
        record(block, (example_hidden_states(config),), leaves=[leaf], nested=[leaf])
    assert [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in children] == before
