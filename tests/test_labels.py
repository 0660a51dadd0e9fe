"""Gate and up are named by what the graph shows feeds the activation, not by position.

The expected rows are read off each toy's own code (the oracle): the concat toy
does ``gate, up = gate_up.chunk(2)`` then ``act(gate) * up``; the GPT-OSS toy
takes ``gate = gate_up[..., ::2]``, ``up = gate_up[..., 1::2]``; the Llama 4
toy does ``gate, up = gate_up.chunk(2)`` then ``up * act(gate)``.
"""

import pytest
import torch

import autocal
from autocal.testing.toy_moe import ToyMoEConfig, make_toy_block

I = 24


def _experts(block):
    return block.experts


@pytest.mark.parametrize("kind", ["concat", "shared_sigmoid_gate", "grouped_sigmoid_bias"])
def test_concatenated_gate_is_first_half(kind):
    block = make_toy_block(ToyMoEConfig(kind=kind, intermediate_size=I))
    packed = block.experts.gate_up_proj.detach().clone()
    module = autocal.synthesize(block)
    for e, expert in enumerate(module.expert_modules()):
        assert torch.equal(expert.gate_proj.weight, packed[e, :I])
        assert torch.equal(expert.up_proj.weight, packed[e, I:])


def test_interleaved_gate_is_even_columns():
    block = make_toy_block(ToyMoEConfig(kind="interleaved", intermediate_size=I))
    packed = block.experts.gate_up_proj.detach().clone()  # [E, H, 2I], used as x @ W
    bias = block.experts.gate_up_proj_bias.detach().clone()
    module = autocal.synthesize(block)
    for e, expert in enumerate(module.expert_modules()):
        assert torch.equal(expert.gate_proj.weight, packed[e][:, ::2].T)
        assert torch.equal(expert.up_proj.weight, packed[e][:, 1::2].T)
        assert torch.equal(expert.gate_proj.bias, bias[e, ::2])
        assert torch.equal(expert.up_proj.bias, bias[e, 1::2])


def test_labels_follow_the_activation_when_the_halves_are_swapped():
    """Same storage, code that activates the *second* half: the labels must swap too."""
    block = make_toy_block(ToyMoEConfig(kind="concat", intermediate_size=I))
    experts = block.experts
    original_forward = type(experts).forward

    def swapped_gate(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e in range(self.gate_up_proj.shape[0]):
            slot, token = torch.where(top_k_index.T == e)
            if token.numel() == 0:
                continue
            up, gate = torch.nn.functional.linear(hidden_states[token], self.gate_up_proj[e]).chunk(2, dim=-1)
            h = torch.nn.functional.linear(self.act_fn(gate) * up, self.down_proj[e])
            out.index_add_(0, token, h * top_k_weights[token, slot, None])
        return out

    type(experts).forward = swapped_gate
    try:
        packed = experts.gate_up_proj.detach().clone()
        module = autocal.synthesize(block)
        expert = module.expert_modules()[0]
        assert torch.equal(expert.gate_proj.weight, packed[0, I:])
        assert torch.equal(expert.up_proj.weight, packed[0, :I])
    finally:
        type(experts).forward = original_forward


def test_dense_batched_labels():
    block = make_toy_block(ToyMoEConfig(kind="scores_on_inputs", intermediate_size=I))
    packed = block.experts.gate_up_proj.detach().clone()  # [E, H, 2I], bmm(x, W)
    module = autocal.synthesize(block)
    for e, expert in enumerate(module.expert_modules()):
        assert torch.equal(expert.gate_proj.weight, packed[e][:, :I].T)
        assert torch.equal(expert.up_proj.weight, packed[e][:, I:].T)
